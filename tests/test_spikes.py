"""train.spike: loss spikes skipped like non-finite steps, rollback past them with a ledger, the bound on rollbacks.

The data: one learnable pattern source whose documents under the samples of steps 13-15 (or 13-18) are
replaced by random tokens from a range the pattern never uses, so the garbage sits at a known place of the
stream (checked by reading the stream back).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.config import ScheduleConfig
from megacpt.schedule import lr_at

from datagen import (
    optimizer_file_state,
    pattern_documents,
    per_step,
    read_metrics,
    tiny_config,
    write_config,
    write_indexed,
)
from launch import assert_ok, deepspeed_launch, run_megacpt, start_process, wait_for_step

G, SEQ, STEPS = 8, 64, 24
GARBAGE = 200  # garbage tokens are >= GARBAGE, the pattern's are below
SPIKE = {"zscore": 4, "window": 8, "max_in_a_row": 3, "lr_factor": 0.5, "lr_steps": 4, "max_rollbacks": 2}
SCHEDULE = {"style": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 2}


def _stream(prefix: str, cache: Path):
    from megacpt.config import DataConfig
    from megacpt.data.datasets import build_train_dataset

    data = DataConfig(sources=[{"name": "a", "prefix": prefix}])
    return build_train_dataset(data, 40 * G, G, SEQ, str(cache), 256, None)


def _garbage_fraction(stream, step: int) -> float:
    """Share of the garbage tokens in the global batch of `step`."""
    return float(np.mean([np.asarray(stream[p]["tokens"]) >= GARBAGE for p in range((step - 1) * G, step * G)]))


def _spiky_data(folder: Path, first: int, last: int) -> str:
    """A pattern source whose steps first..last (global batch G) read random tokens only."""
    docs = pattern_documents(11, 3, 800, SEQ)
    prefix = write_indexed(folder / "a", docs)
    stream = _stream(prefix, folder / "probe")
    epoch = stream.sources[0].epochs[0]  # megatron's GPTDataset: sample -> its first document
    bad = set()
    for p in range((first - 1) * G, last * G):
        _, n = stream.blend.locate(p)
        bad.add(int(epoch.document_index[epoch.sample_index[epoch.shuffle_index[n]][0]]))
    rng = np.random.default_rng(0)
    write_indexed(folder / "a", [rng.integers(GARBAGE, 256, SEQ).tolist() if i in bad else d
                                 for i, d in enumerate(docs)])
    stream = _stream(prefix, folder / "probe2")
    fractions = {step: _garbage_fraction(stream, step) for step in range(1, STEPS + 1)}
    assert all(fractions[s] == 1.0 for s in range(first, last + 1)), fractions
    assert all(fractions[s] == 0.0 for s in fractions if not first <= s <= last), fractions
    return prefix


@pytest.fixture(scope="module")
def spiky(tmp_path_factory) -> str:
    return _spiky_data(tmp_path_factory.mktemp("spiky"), 13, 15)


def _config(tmp_path: Path, prefix: str, spike: dict | None = None, **train) -> str:
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": prefix}], schedule=SCHEDULE,
                         logging={"sample_ledger": True},
                         train={"steps": STEPS, "global_batch_size": G, "micro_batch_size": 4, "save_interval": 5,
                                "log_interval": 1, "spike": {**SPIKE, **(spike or {})}, **train})
    return write_config(tmp_path / "c.json", config)


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("event") == kind]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, spiky):
    tmp_path = tmp_path_factory.mktemp("reference")
    assert_ok(run_megacpt(["train", _config(tmp_path, spiky)]))
    return tmp_path / "run"


def test_spikes_are_skipped_then_the_run_rolls_back_past_them(reference):
    rollbacks = _events(reference, "rollback")  # the spike records of steps 13-15 went with the rollback
    assert [(r["step"], r["at_step"], r["spiked_steps"], r["rollback"]) for r in rollbacks] == [
        (10, 15, [13, 14, 15], 1)]
    spikes = rollbacks[0]["spikes"]
    assert [(r["step"], r["in_a_row"]) for r in spikes] == [(13, 1), (14, 2), (15, 3)]
    ledger = json.loads((reference / "spike_ledger.json").read_text())
    assert [(r["at_step"], r["to_step"]) for r in ledger["rollbacks"]] == [(15, 10)]
    assert [(b["step"], b["samples"]) for b in ledger["rollbacks"][0]["batches"]] == [
        (s, [(s - 1) * G, s * G]) for s in (13, 14, 15)]
    assert [b["loss"] for b in ledger["rollbacks"][0]["batches"]] == [r["loss"] for r in spikes]
    # after the rollback: every step once, the spiked batches skipped, the LR halved for steps 11-14
    assert [r["step"] for r in _events(reference, "spike_ledger_skip")] == [13, 14, 15]
    train = per_step(reference)
    assert sorted(train) == list(range(1, STEPS + 1))
    schedule = ScheduleConfig(**SCHEDULE)
    for step, record in train.items():
        factor = 0.5 if 11 <= step <= 14 else 1.0
        assert record["lr"] == lr_at(schedule, STEPS, step - 1) * factor, step
    assert train[STEPS]["skipped_steps"] == 6  # by this process: three spikes, then their three ledger steps
    assert sum(train[STEPS]["samples"].values()) == STEPS * G
    assert (reference / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"
    # the sample ledger was rewound with the rollback: every step once, each its own global batch
    lines = [json.loads(line) for line in (reference / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples"]["a"]) for r in lines] == [(s, list(range((s - 1) * G, s * G)))
                                                                for s in range(1, STEPS + 1)]


def test_skipped_spikes_leave_the_weights_and_adam_untouched(tmp_path, spiky):
    """No rollback (max_in_a_row 10): the checkpoint after the spiked steps 13-15 equals the one before them."""
    cfg = _config(tmp_path, spiky, {"max_in_a_row": 10}, steps=15, save_interval=3)
    assert main(["train", cfg]) == 0
    spikes = _events(tmp_path / "run", "spike")
    assert [r["step"] for r in spikes] == [13, 14, 15]
    # the window: the losses of steps 5-12, as an independent mean and sample standard deviation
    train = per_step(tmp_path / "run")
    window = [train[step]["loss"] for step in range(5, 13)]
    for spike in spikes:
        assert spike["window_mean"] == pytest.approx(np.mean(window), rel=1e-12)
        assert spike["window_std"] == pytest.approx(np.std(window, ddof=1), rel=1e-12)
        assert spike["loss"] > np.mean(window) + SPIKE["zscore"] * np.std(window, ddof=1)
    assert train[12]["loss"] < np.mean(window) + SPIKE["zscore"] * np.std(window, ddof=1)
    _, before = optimizer_file_state(tmp_path / "run" / "checkpoints" / "step00000012")
    _, after = optimizer_file_state(tmp_path / "run" / "checkpoints" / "step00000015")
    for (p0, m0, v0, t0), (p1, m1, v1, t1) in zip(before, after, strict=True):
        assert p0.equal(p1) and m0.equal(m1) and v0.equal(v1) and t0 == t1
    assert per_step(tmp_path / "run")[15]["skipped_steps"] == 3


def _wait_after_rollback(run_dir: Path, proc: subprocess.Popen, step: int | None) -> None:
    """Until metrics.jsonl holds the rollback (and, with `step`, that step trained again after it)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the kill"
        path = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.is_file() else []
        seen = [i for i, r in enumerate(records) if r.get("event") == "rollback"]
        if seen and (step is None or any(r["step"] >= step and "loss" in r for r in records[seen[0]:])):
            return
        time.sleep(0.01)
    raise TimeoutError("no rollback")


@pytest.mark.parametrize("kill_after", ["step 11", "rollback", "step 17"])
def test_kill_9_before_or_after_the_rollback_then_resume_gives_the_same_result(tmp_path, spiky, reference, kill_after):
    """Killed before the spikes (the resume judges them against the window saved at step 10), right after the
    rollback, or after a checkpoint saved since (step 15)."""
    cfg = _config(tmp_path, spiky)
    proc = start_process([sys.executable, "-m", "megacpt", "train", cfg])
    if kill_after == "step 11":
        wait_for_step(tmp_path / "run", 11, proc)
    else:
        _wait_after_rollback(tmp_path / "run", proc, 17 if kill_after == "step 17" else None)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert_ok(run_megacpt(["train", cfg]))
    resumed, straight = per_step(tmp_path / "run"), per_step(reference)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in resumed:
        assert (resumed[step]["loss"], resumed[step]["lr"]) == (straight[step]["loss"], straight[step]["lr"]), step
    assert (tmp_path / "run" / "spike_ledger.json").read_text() == (reference / "spike_ledger.json").read_text()


def test_after_max_rollbacks_the_run_stops_with_exit_2(tmp_path, capsys):
    """Garbage at steps 13-18: the rollback at 15 skips 13-15, then 16-18 spike too and a second is refused."""
    (tmp_path / "data").mkdir()
    prefix = _spiky_data(tmp_path / "data", 13, 18)
    assert main(["train", _config(tmp_path, prefix, {"max_rollbacks": 1})]) == 2
    err = capsys.readouterr().err
    assert "steps 16, 17, 18 were loss spikes in a row" in err and "train.spike.max_rollbacks = 1" in err
    assert "Traceback" not in err
    ledger = json.loads((tmp_path / "run" / "spike_ledger.json").read_text())
    assert [[b["step"] for b in r["batches"]] for r in ledger["rollbacks"]] == [[13, 14, 15]]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step00000015"  # saved after the rollback


def test_no_checkpoint_to_roll_back_to_is_exit_2(tmp_path, spiky, capsys):
    assert main(["train", _config(tmp_path, spiky, save_interval=0)]) == 2
    err = capsys.readouterr().err
    assert "nothing to roll back to" in err and "train.save_interval" in err and "Traceback" not in err


@pytest.mark.parametrize("key, value", [("zscore", 0), ("zscore", -1), ("window", 1), ("max_in_a_row", 0),
                                        ("lr_factor", 0), ("lr_factor", 1.5), ("lr_steps", -1),
                                        ("max_rollbacks", -1), ("zscores", 3)])
def test_bad_spike_configs_exit_2_naming_the_key(tmp_path, spiky, capsys, key, value):
    assert main(["train", _config(tmp_path, spiky, {key: value})]) == 2
    err = capsys.readouterr().err
    assert f"train.spike.{key}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_damaged_ledger_is_exit_2_naming_the_file(tmp_path, spiky, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "spike_ledger.json").write_text('{"format": 1, "rollbacks": [{"at_step": "x"}]}')
    assert main(["train", _config(tmp_path, spiky)]) == 2
    err = capsys.readouterr().err
    assert "spike_ledger.json" in err and "rollbacks.0" in err and "Traceback" not in err


@pytest.mark.launcher
def test_two_ranks_judge_alike_and_roll_back_as_one_rank_does(tmp_path, spiky, reference):
    """Data-parallel 2: the spikes, the rollback and the ledger's batches are those of the one-rank run."""
    result = deepspeed_launch(2, ["megacpt", "train", _config(tmp_path, spiky)])
    assert_ok(result)
    assert [r["spiked_steps"] for r in _events(tmp_path / "run", "rollback")] == [[13, 14, 15]]
    ledger = json.loads((tmp_path / "run" / "spike_ledger.json").read_text())
    expected = json.loads((reference / "spike_ledger.json").read_text())
    assert [[(b["step"], b["samples"]) for b in r["batches"]] for r in ledger["rollbacks"]] == [
        [(b["step"], b["samples"]) for b in r["batches"]] for r in expected["rollbacks"]]
    two, one = per_step(tmp_path / "run"), per_step(reference)
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-5), step
