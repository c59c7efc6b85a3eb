"""The shared plumbing: atomic writes keep the old file on any failure, output errors name the option,
argparse types refuse out-of-range values, tables align what they are given."""
from __future__ import annotations

import argparse
import os

import pytest

from megacpt import files
from megacpt.cli_helpers import non_negative_int, positive_int, text_table, unit_fraction
from megacpt.errors import UserError


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    files.write_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("step00000002")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        files.write_atomic(target, "step00000004")
    assert target.read_text() == "step00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_staged_folder_is_renamed_into_place_with_its_files(tmp_path):
    staging = tmp_path / ".out.partial"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "weights.pt").write_bytes(b"w")
    files.replace_durably(staging, tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "weights.pt").read_bytes() == b"w" and not staging.exists()


def test_an_output_that_cannot_be_written_is_a_user_error_naming_the_option_and_path(tmp_path):
    with pytest.raises(UserError, match=f"cannot write --csv {tmp_path}/missing/lr.csv"):
        files.write_output(tmp_path / "missing" / "lr.csv", "step,lr\n", "--csv", overwrite=False)


@pytest.mark.parametrize("parse, text, message", [
    (positive_int, "0", "must be >= 1, got 0"),
    (positive_int, "x", "expected a number, got 'x'"),
    (non_negative_int, "-1", "must be >= 0, got -1"),
    (unit_fraction, "1.5", "must be in (0, 1], got 1.5"),
])
def test_argparse_types_refuse_out_of_range_values(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("(", r"\(").replace("]", r"\]")):
        parse(text)


def test_argparse_types_accept_their_range():
    assert (positive_int("3"), non_negative_int("0"), unit_fraction("1")) == (3, 0, 1.0)


def test_text_table_aligns_columns_and_keeps_cells_as_given():
    table = text_table([("a", "1.5000"), ("longer", "10.0000")], ["name", "loss"], align=("left", "right"))
    assert table.splitlines() == ["name       loss", "a        1.5000", "longer  10.0000"]
