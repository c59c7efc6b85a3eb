"""checkpoint.async_save: DeepSpeed's decoupled checkpoint engine writes while the next step computes (seen from
the writer process and the loop's clock); the tag gets its manifest and `latest` only once its files are
complete, and a kill between DeepSpeed's commit and megacpt's manifest leaves the previous checkpoint in charge."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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


# Every process that imports it (the writer processes too: DeepSpeed spawns them, and they inherit PYTHONPATH)
# makes DeepSpeed's file writer take WRITE_SECONDS longer and logs each write: process, file, start and end.
SLOW_WRITER = """
import json, os, time
import deepspeed.runtime.checkpoint_engine.fast_checkpoint_engine as fast

_save = fast.FastCheckpointEngine.save

def slow_logged_save(self, state_dict, path):
    start = time.time()
    time.sleep({seconds})
    done = _save(self, state_dict, path)
    with open({log!r}, "a") as log:
        log.write(json.dumps({{"pid": os.getpid(), "path": str(path), "start": start, "end": time.time()}}) + "\\n")
    return done

fast.FastCheckpointEngine.save = slow_logged_save
"""
WRITE_SECONDS = 1.5

STEP_TIMES = """
import json, os, sys, time
from megacpt.config import load_config
from megacpt.train.callbacks import Callback
from megacpt.train.trainer import train

class StepTimes(Callback):
    def __init__(self):
        self.begun = {}
    def before_step(self, loop, step):
        self.begun[step] = time.time()

times = StepTimes()
train(load_config(sys.argv[1]), [times])
json.dump({"pid": os.getpid(), "begun": times.begun}, open(sys.argv[2], "w"))
"""


def test_the_write_overlaps_the_next_step(tmp_path, pattern_data, synchronous):
    """With a writer slowed by WRITE_SECONDS, each model file is written by another process than the loop's,
    and that write is still going on after the next step has begun (the loop waits for it before that step's
    update). With the decoupled engine off, the loop's own process would write it, before going on."""
    cfg, log, times = _config(tmp_path, pattern_data), tmp_path / "writes.jsonl", tmp_path / "times.json"
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text(SLOW_WRITER.format(seconds=WRITE_SECONDS, log=str(log)))
    env = {**clean_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path / "hooks"), *sys.path])}
    assert_ok(subprocess.run([sys.executable, "-c", STEP_TIMES, cfg, str(times)], env=env, capture_output=True,
                             text=True, timeout=600))
    loop = json.loads(times.read_text())
    writes = {Path(w["path"]).parent.name: w for w in map(json.loads, log.read_text().splitlines())
              if w["path"].endswith("mp_rank_00_model_states.pt")}
    assert sorted(writes) == ["step00000004", "step00000008", "step00000012"]
    for step in (4, 8):
        write = writes[f"step{step:08d}"]
        assert write["pid"] != loop["pid"]  # DeepSpeed's writer process
        # the next step began while the write still had at least half its time to go (the writer process may
        # pick the work up a moment after the step began: only the overlap is the claim)
        assert loop["begun"][str(step + 1)] < write["end"] - WRITE_SECONDS / 2
    assert _losses(tmp_path / "run") == _losses(synchronous)


KILL_AFTER_THE_COMMIT = """
import os, signal, sys
from deepspeed.runtime.checkpoint_engine.decoupled_checkpoint_engine import DecoupledCheckpointEngine
from megacpt.cli import main

commit = DecoupledCheckpointEngine.commit

def killed_once_step_8_is_committed(self, info):
    done = commit(self, info)
    if info.tag == "step00000008":  # DeepSpeed's files are complete; the loop has gone on to step 9
        os.kill(os.getpid(), signal.SIGKILL)
    return done

DecoupledCheckpointEngine.commit = killed_once_step_8_is_committed
sys.exit(main(["train", sys.argv[1]]))
"""


def test_a_kill_between_the_commit_and_the_manifest_leaves_the_previous_checkpoint_in_charge(
        tmp_path, pattern_data, synchronous):
    """SIGKILL right after DeepSpeed's commit of step 8 (its files complete, megacpt's manifest and `latest`
    not yet written): `latest` still names step 4, step 8 has no manifest, and the rerun resumes from step 4
    and trains exactly as a run never killed."""
    cfg = _config(tmp_path, pattern_data)
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", KILL_AFTER_THE_COMMIT, cfg], env=clean_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        code = proc.wait(timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)  # DeepSpeed's writer process does not end with its killed parent
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000004"
    assert (checkpoints / "step00000008" / "mp_rank_00_model_states.pt").is_file()  # committed, then killed
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
