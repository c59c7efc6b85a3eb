"""data.continue_sources: a source read by an earlier stage goes on at its first unused sample."""
import json
import shutil

import numpy as np
import pytest

from megacpt.checkpoint import tags as checkpoint
from megacpt.cli import main
from megacpt.data.datasets import SourceStream
from megacpt.policy.stages import read_state

from datagen import random_documents, samples_trained, tiny_config, train_recording, write_config, write_indexed


@pytest.fixture
def small(tmp_path) -> str:
    """Random tokens, 15 samples of 64 + 1 tokens per epoch: every sample distinct, epochs end soon."""
    return write_indexed(tmp_path / "small", random_documents(7, 10, 100))


def _stage0(tmp_path, pattern_data, small) -> dict:
    sources = [{"name": "x", "prefix": small}, {"name": "a", "prefix": pattern_data["a"]}]
    return tiny_config(tmp_path / "stage0", sources,
                       train={"steps": 4, "global_batch_size": 4, "micro_batch_size": 2})


def _stage1(tmp_path, pattern_data, small, **data) -> dict:
    """Another mix, batch size and length: x as a replay source at a scheduled fraction, beside new data."""
    return tiny_config(tmp_path / "stage1", [{"name": "b", "prefix": pattern_data["b"]}],
                       data={"continue_sources": True, **data,
                             "replay": {"fraction": [[0, 0.75], [1.0, 0.25]],
                                        "sources": [{"name": "xx", "prefix": small}]}},
                       init={"checkpoint": str(tmp_path / "stage0" / "checkpoints")},
                       train={"steps": 5, "global_batch_size": 6, "micro_batch_size": 3})


def test_a_continued_source_repeats_and_skips_nothing_across_two_stages(tmp_path, pattern_data, small, world,
                                                                         monkeypatch, capsys):
    rows0 = train_recording(monkeypatch, write_config(tmp_path / "s0.json", _stage0(tmp_path, pattern_data, small)))
    rows1 = train_recording(monkeypatch, write_config(tmp_path / "s1.json", _stage1(tmp_path, pattern_data, small)))
    stream = SourceStream(small, 40, 64, 1234, str(tmp_path / "cache"), 256, -1)
    samples = [tuple(stream[i]["tokens"].tolist()) for i in range(40)]
    x0 = [r for r in rows0 if r in samples]
    x1 = [r for r in rows1 if r in samples]
    n0 = samples_trained(tmp_path / "stage0")["x"]
    n1 = samples_trained(tmp_path / "stage1")["xx"]
    assert len(x0) == n0 == 8 and len(x1) == n1 and n1 > stream.epoch_size - n0  # stage 1 crosses the epoch's end
    assert x0 + x1 == samples[:n0 + n1]  # in order: nothing repeated, nothing skipped
    assert len(set(samples[:stream.epoch_size])) == stream.epoch_size
    record = read_state(checkpoint.resolve_tag(tmp_path / "stage1" / "checkpoints")).stages
    assert (record[0].sources["x"].start, record[0].sources["x"].stop) == (0, 8)
    assert (record[1].sources["xx"].start, record[1].sources["xx"].stop) == (8, 8 + n1)
    assert record[1].sources["b"].start == 0 and record[1].sources["xx"].files == record[0].sources["x"].files
    capsys.readouterr()
    assert main(["train", str(tmp_path / "s1.json"), "--dry-run", "--json"]) == 0  # a resume: still continued
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["continued_sources"] == {"xx": 8}


def test_without_continuation_the_source_starts_over(tmp_path, pattern_data, small, world, monkeypatch):
    rows0 = train_recording(monkeypatch, write_config(tmp_path / "s0.json", _stage0(tmp_path, pattern_data, small)))
    config = _stage1(tmp_path, pattern_data, small, continue_sources=False)
    rows1 = train_recording(monkeypatch, write_config(tmp_path / "s1.json", config))
    x0 = [r for r in rows0 if not set(r) <= {(3 + 7 * i) % 256 for i in range(11)}]
    assert rows1.count(x0[0]) >= 1  # the first sample comes again


@pytest.mark.parametrize("change", ["rewrite", "grow"])
def test_a_continued_source_whose_files_changed_is_refused_naming_the_file(tmp_path, pattern_data, small, capsys,
                                                                            change):
    assert main(["train", write_config(tmp_path / "s0.json", _stage0(tmp_path, pattern_data, small))]) == 0
    bin_path = small + ".bin"
    if change == "rewrite":  # same size, other tokens
        data = np.fromfile(bin_path, dtype=np.uint16)
        data[5] = (data[5] + 1) % 256
        data.tofile(bin_path)
    else:  # another document appended: .idx and .bin both grow
        shutil.copy(write_indexed(tmp_path / "more", random_documents(7, 11, 100)) + ".bin", bin_path)
        shutil.copy(str(tmp_path / "more.idx"), small + ".idx")
    capsys.readouterr()
    assert main(["train", write_config(tmp_path / "s1.json", _stage1(tmp_path, pattern_data, small))]) == 2
    err = capsys.readouterr().err
    assert "data.continue_sources" in err and "small." in err and "changed" in err and "Traceback" not in err
    assert not (tmp_path / "stage1" / "metrics.jsonl").exists()


def test_seen_only_replay_reads_the_same_record_as_continuation(tmp_path, pattern_data, small, world, monkeypatch):
    """Stage 2 replays, seen-only, exactly what stages 0 and 1 read of x (one contiguous range of its stream)."""
    train_recording(monkeypatch, write_config(tmp_path / "s0.json", _stage0(tmp_path, pattern_data, small)))
    train_recording(monkeypatch, write_config(tmp_path / "s1.json", _stage1(tmp_path, pattern_data, small)))
    n = read_state(checkpoint.resolve_tag(tmp_path / "stage1" / "checkpoints")).stages[-1].sources["xx"].stop
    stage2 = tiny_config(tmp_path / "stage2", [{"name": "c", "prefix": pattern_data["c"]}],
                         data={"replay": {"fraction": 0.5, "seen_only": True,
                                          "sources": [{"name": "x", "prefix": small}]}},
                         init={"checkpoint": str(tmp_path / "stage1" / "checkpoints")},
                         train={"steps": n // 2, "global_batch_size": 4, "micro_batch_size": 2})
    rows2 = train_recording(monkeypatch, write_config(tmp_path / "s2.json", stage2))
    stream = SourceStream(small, n, 64, 1234, str(tmp_path / "cache"), 256, -1)
    seen = {tuple(stream[i]["tokens"].tolist()) for i in range(n)}
    replayed = [r for r in rows2 if not set(r) <= {(50 + 7 * i) % 256 for i in range(17)}]  # not pattern c
    assert len(replayed) == len(set(replayed)) == 2 * (n // 2) and set(replayed) <= seen  # one pass, seen only
