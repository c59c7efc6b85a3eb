"""checkpoint.async_save: DeepSpeed's decoupled checkpoint engine writes while the next step computes; the tag
gets its manifest and `latest` only once its files are complete, and a kill during the save leaves the previous
checkpoint in charge."""
import json
import os
import signal
import subprocess
import sys

import pytest

from megacpt.checkpoint import manifest

from datagen import optimizer_file_state, read_metrics, tiny_config, write_config
from launch import assert_ok, clean_env, deepspeed_launch, run_megacpt

STEPS = 12


def _config(tmp_path, pattern_data, name="run", asynchronous=True, **deepspeed) -> str:
    config = tiny_config(tmp_path / name, [{"name": "a", "prefix": pattern_data["a"]}],
                         train={"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "save_interval": 4},
                         checkpoint={"async_save": asynchronous}, deepspeed=deepspeed)
    return write_config(tmp_path / f"{name}.json", config)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory, pattern_data):
    tmp_path = tmp_path_factory.mktemp("sync")
    assert_ok(run_megacpt(["train", _config(tmp_path, pattern_data, asynchronous=False)]))
    return tmp_path / "run"


def test_asynchronous_saves_equal_synchronous_ones(tmp_path, pattern_data, synchronous):
    assert_ok(run_megacpt(["train", _config(tmp_path, pattern_data)]))
    run = tmp_path / "run"
    assert _losses(run) == _losses(synchronous)
    saves = [r for r in read_metrics(run) if r.get("event") == "checkpoint"]
    assert [(r["step"], r["async"]) for r in saves] == [(4, True), (8, True), (12, True)]
    for step in (4, 8, 12):
        tag = f"step{step:08d}"
        assert manifest.problems(run / "checkpoints" / tag) == []
        (_, ours), (_, theirs) = (optimizer_file_state(r / "checkpoints" / tag) for r in (run, synchronous))
        for mine, other in zip(ours, theirs, strict=True):
            assert all(a.equal(b) for a, b in zip(mine[:3], other[:3])) and mine[3] == other[3]
    assert (run / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"


KILL_DURING_SAVE = """
import os, signal, sys
from megacpt.checkpoint import save as checkpoint
from megacpt.cli import main

finish = checkpoint.PendingSave.finish

def killed_during_the_save_of_step_8(self, engine):
    if self.tag_dir.name == "step00000008":  # the loop went on to step 9; DeepSpeed's writer may still write
        os.kill(os.getpid(), signal.SIGKILL)
    return finish(self, engine)

checkpoint.PendingSave.finish = killed_during_the_save_of_step_8
sys.exit(main(["train", sys.argv[1]]))
"""


def test_a_kill_during_an_asynchronous_save_leaves_the_previous_checkpoint_in_charge(tmp_path, pattern_data,
                                                                                    synchronous):
    cfg = _config(tmp_path, pattern_data)
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, cfg], env=clean_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        code = proc.wait(timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)  # DeepSpeed's writer process does not end with its killed parent
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000004"
    assert not (checkpoints / "step00000008" / manifest.MANIFEST).exists()  # the unfinished save
    assert manifest.problems(checkpoints / "step00000004") == []
    assert_ok(run_megacpt(["train", cfg]))  # resumes at step 4 and writes step 8 again
    assert _losses(tmp_path / "run") == _losses(synchronous)
    assert all(manifest.problems(checkpoints / f"step{s:08d}") == [] for s in (4, 8, 12))
    saves = [r["step"] for r in read_metrics(tmp_path / "run") if r.get("event") == "checkpoint"]
    assert saves == [4, 8, 12]


def test_zero_1_with_async_save_is_exit_2_naming_the_key(tmp_path, pattern_data, capsys):
    from megacpt.cli import main

    cfg = _config(tmp_path, pattern_data, zero_optimization={"stage": 1})
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.async_save" in err and "ZeRO stage 0" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.launcher
def test_two_ranks_save_asynchronously_as_synchronously(tmp_path, pattern_data):
    """Data-parallel 2, ZeRO 0: rank 0's writer process writes the model file; the tags verify and training
    equals a synchronous run's."""
    results = {}
    for name, asynchronous in (("sync", False), ("async", True)):
        cfg = _config(tmp_path, pattern_data, name, asynchronous)
        assert_ok(deepspeed_launch(2, ["megacpt", "train", cfg]))
        results[name] = _losses(tmp_path / name)
        checkpoints = tmp_path / name / "checkpoints"
        assert all(manifest.problems(checkpoints / f"step{s:08d}") == [] for s in (4, 8, 12))
    assert results["async"] == results["sync"]
    state = json.loads((tmp_path / "async" / "checkpoints" / "step00000012" / "megacpt_state.json").read_text())
    assert state["step"] == STEPS
