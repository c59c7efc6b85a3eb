"""A checkpoint written by an earlier megacpt (tests/fixtures/checkpoint_format2, made at commit 87ff003 with
the tiny preset, a constant LR and `save_interval` 4, then `train.steps` 4) resumes with this code and trains
exactly the steps the earlier code trained in one uninterrupted 8-step run (straight_losses.json)."""
import json
import shutil
from pathlib import Path

from megacpt.cli import main

from datagen import read_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_format2"


def test_a_checkpoint_of_the_earlier_format_resumes_bit_exact(tmp_path, monkeypatch):
    shutil.copytree(FIXTURE, tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")  # the fixture's config names its data and run dir relative to it
    assert main(["checkpoint", "verify", "stage"]) == 0
    assert main(["train", "stage.json", "--set", "train.steps=8"]) == 0
    expected = {int(step): loss for step, loss in json.loads((FIXTURE / "straight_losses.json").read_text())
                ["losses"].items()}
    trained = {r["step"]: r["loss"] for r in read_metrics("stage") if "loss" in r and "event" not in r}
    assert trained == expected  # steps 1-4 as the earlier code logged them, 5-8 trained now: all bit-identical
