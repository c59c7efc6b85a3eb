"""checkpoint.async_save at every ZeRO stage: a tag's files are copied to host memory at the step boundary and
written by a background thread while the next steps compute (checkpoint/async_writer.py). The files are byte for
byte those of a synchronous save, the write overlaps the next step, a kill -9 at every moment of the save leaves
the previous checkpoint in charge and the rerun bit-exact, and two ranks at ZeRO 1 and 2 resume bit-exactly
from tags written this way."""
import collections
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacpt.checkpoint import manifest
from megacpt.checkpoint.async_writer import host_copy

from datagen import read_metrics, tiny_config, write_config
from launch import assert_ok, clean_env, deepspeed_launch, run_megacpt, run_python

STEPS = 12
SAVES = (4, 8, 12)


def _config(tmp_path, pattern_data, name="run", asynchronous=True, zero=1, precision="fp32", **sections) -> str:
    config = tiny_config(tmp_path / name, [{"name": "a", "prefix": pattern_data["a"]}],
                         train={"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "save_interval": 4},
                         checkpoint={"async_save": asynchronous},
                         deepspeed={"zero_optimization": {"stage": zero}, "bf16": {"enabled": precision == "bf16"}},
                         **sections)
    return write_config(tmp_path / f"{name}.json", config)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _tag(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step{step:08d}"


def _torch_files(tag_dir: Path) -> dict[str, bytes]:
    """Every file of the tag that torch wrote (DeepSpeed's model and optimizer files, RNG states), with its bytes."""
    return {str(p.relative_to(tag_dir)): p.read_bytes() for p in sorted(tag_dir.rglob("*.pt"))}


# `megacpt train` as it runs on a GPU in bf16: without CUDA megacpt trains in fp32 (runtime/engine.py turns
# the config's bf16 off); this keeps it on, and DeepSpeed's ZeRO bf16 optimizer (bf16 weights and gradients,
# an fp32 master partition, files bf16_zero_pp_rank_*) runs on the CPU as on a GPU.
BF16_TRAIN = """
import sys
from megacpt.runtime import engine
engine._without_gpu_precision = lambda ds: ds
from megacpt.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _train(cfg: str, precision: str) -> None:
    assert_ok(run_megacpt(["train", cfg]) if precision == "fp32" else run_python(["-c", BF16_TRAIN, cfg]))


def _saved(tmp_path_factory, pattern_data, zero: int, precision: str) -> Path:
    tmp_path = tmp_path_factory.mktemp(f"sync{zero}{precision}")
    _train(_config(tmp_path, pattern_data, asynchronous=False, zero=zero, precision=precision), precision)
    return tmp_path / "run"


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory, pattern_data):
    """The synchronous runs by ZeRO stage and precision (made when first asked for)."""
    runs = {}

    def run(zero: int, precision: str = "fp32") -> Path:
        if (zero, precision) not in runs:
            runs[zero, precision] = _saved(tmp_path_factory, pattern_data, zero, precision)
        return runs[zero, precision]
    return run


def test_a_host_copy_saves_to_the_same_bytes_and_no_longer_follows_the_original():
    """Shared storages, views with offsets and strides, bf16, a Parameter, a non-leaf tensor that requires grad,
    empty tensors and a state dict's `_metadata`: torch.save writes the copy exactly as the original."""
    flat = torch.arange(24, dtype=torch.float32).to(torch.bfloat16)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    module = collections.OrderedDict(w=flat[:12].view(3, 4), b=flat[12:], t=flat[2:10].view(2, 4).t())
    module._metadata = {"": {"version": 1}}
    state = {"module": module, "optimizer": {"p": weight, "non_leaf": (weight * 2)[1:], "empty": torch.empty(0),
                                             "also_empty": torch.empty(0), "step": torch.tensor(5)},
             "twice": [module["w"], module["w"]], "other": (1.5, "s", None)}

    def saved(obj) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    copied = host_copy(state)
    assert saved(copied) == saved(state)
    assert copied["module"]["w"].untyped_storage().data_ptr() == copied["module"]["t"].untyped_storage().data_ptr()
    before = saved(copied)
    with torch.no_grad():
        flat.add_(1)
        weight.add_(1)
    assert saved(copied) == before != saved(state)  # the copy is the state of the moment it was taken


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_asynchronous_tags_are_the_synchronous_ones_byte_for_byte(tmp_path, pattern_data, synchronous, zero):
    assert_ok(run_megacpt(["train", _config(tmp_path, pattern_data, zero=zero)]))
    run, sync = tmp_path / "run", synchronous(zero)
    assert _losses(run) == _losses(sync)
    saves = [r for r in read_metrics(run) if r.get("event") == "checkpoint"]
    assert [(r["step"], r["async"]) for r in saves] == [(s, True) for s in SAVES]
    for step in SAVES:
        assert manifest.problems(_tag(run, step)) == []
        assert sorted(p.name for p in _tag(run, step).iterdir()) == sorted(p.name for p in _tag(sync, step).iterdir())
        assert _torch_files(_tag(run, step)) == _torch_files(_tag(sync, step))
    if zero:
        assert any("optim_states" in name for name in _torch_files(_tag(run, STEPS)))
    assert (run / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"
    assert run_megacpt(["checkpoint", "verify", str(run)]).returncode == 0


# A driver that trains in this process with hooks: the write of each DeepSpeed file of steps 4 and 8 waits until
# the loop has begun the step after the next (at most GATE_SECONDS), and every write is logged with its thread.
OVERLAP = """
import json, sys, threading, time
import torch
from megacpt.config import load_config
from megacpt.train.callbacks import Callback
from megacpt.train.trainer import train

real_save, writes, current = torch.save, [], [0]

def gated_save(obj, f, *args, **kwargs):
    gate = next((s + 2 for s in (4, 8) if f"step{{s:08d}}" in str(f) and "states.pt" in str(f)), 0)
    deadline = time.time() + {seconds}
    while current[0] < gate and time.time() < deadline:
        time.sleep(0.01)
    done = real_save(obj, f, *args, **kwargs)
    writes.append({{"thread": threading.get_ident(), "path": str(f), "step_at_end": current[0],
                   "timed_out": current[0] < gate}})
    return done

torch.save = gated_save

class Steps(Callback):
    def before_step(self, loop, step):
        current[0] = step

train(load_config(sys.argv[1]), [Steps()])
json.dump({{"thread": threading.get_ident(), "writes": writes}}, open(sys.argv[2], "w"))
"""
GATE_SECONDS = 20


def test_the_write_overlaps_the_next_step(tmp_path, pattern_data, synchronous):
    """The model and optimizer files of steps 4 and 8 are written by another thread than the loop's, and their
    writes can end only once the loop has begun step 6 (10): the loop trained a whole step, update included,
    while they were being written. A loop that waited for them (synchronous saves, or a wait before the next
    update) would leave the writes waiting out GATE_SECONDS instead."""
    cfg, out = _config(tmp_path, pattern_data), tmp_path / "writes.json"
    assert_ok(subprocess.run([sys.executable, "-c", OVERLAP.format(seconds=GATE_SECONDS), cfg, str(out)],
                             env=clean_env(), capture_output=True, text=True, timeout=600))
    seen = json.loads(out.read_text())
    for step in (4, 8):
        mine = [w for w in seen["writes"] if f"step{step:08d}" in w["path"] and "states.pt" in w["path"]]
        assert {Path(w["path"]).name for w in mine} == {"mp_rank_00_model_states.pt",
                                                        "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
        for write in mine:
            assert write["thread"] != seen["thread"]  # the background writer
            assert not write["timed_out"] and write["step_at_end"] >= step + 2, write
    assert _losses(tmp_path / "run") == _losses(synchronous(1))


# A driver that kills its own process with SIGKILL at one moment of the asynchronous save of step 8.
KILL = """
import os, signal, sys, time
from pathlib import Path
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from megacpt.checkpoint import async_writer, save
from megacpt.cli import main
from megacpt.runtime import engine

moment, TAG = sys.argv[2], "step00000008"
if sys.argv[3] == "bf16":  # as BF16_TRAIN
    engine._without_gpu_precision = lambda ds: ds

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

if moment == "snapshot":  # the model states copied to host memory and queued, the optimizer partition not yet
    copy_then_queue = async_writer.BackgroundWriter.save
    def copying(self, state_dict, path):
        if TAG in path and "optim_states" in path:
            kill()
        return copy_then_queue(self, state_dict, path)
    async_writer.BackgroundWriter.save = copying
elif moment == "write":  # the writer thread half way through the optimizer file, until the loop has trained
    # step 12 and has had 3 s to go on to the manifest and `latest` of step 8 (which it must not do)
    write = TorchCheckpointEngine.save
    def half_written(self, state_dict, path):
        if TAG in path and "optim_states" in path:
            with open(path, "wb") as f:
                f.write(b"PK" + bytes(4096))
            root = Path(path).parents[1]
            while '"step": 12' not in (root.parent / "metrics.jsonl").read_text():
                time.sleep(0.05)
            deadline = time.time() + 3
            while time.time() < deadline and not (root / "latest").read_text() == TAG:
                time.sleep(0.05)
            kill()
        return write(self, state_dict, path)
    TorchCheckpointEngine.save = half_written
elif moment == "commit":  # the files written and fsynced, the manifest not yet
    finish = async_writer.BackgroundWriter.finish
    def finished(self):
        tag = self._tag
        done = finish(self)
        if tag is not None and tag.tag == TAG:
            kill()
        return done
    async_writer.BackgroundWriter.finish = finished
elif moment == "latest":  # the manifest written, `latest` not yet moved
    write_atomic = save.write_atomic
    def moved(path, text, *args, **kwargs):
        if path.name == "latest" and text == TAG:
            kill()
        return write_atomic(path, text, *args, **kwargs)
    save.write_atomic = moved
sys.exit(main(["train", sys.argv[1]]))
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("moment", ["snapshot", "write", "commit", "latest"])
def test_a_kill_at_any_moment_of_an_asynchronous_save_resumes_bit_exactly(tmp_path, pattern_data, synchronous,
                                                                         moment, precision):
    """ZeRO 1, in fp32 and in bf16 (DeepSpeed's bf16 optimizer, as 8B-10B runs train): SIGKILL during the host
    copy of step 8, half way through its background write (held there until the loop waits for it at the save
    of step 12), between the writer's finish and the manifest, and between the manifest and `latest`. `latest`
    still names step 4, and the rerun resumes from there and ends with the losses and the tag of a synchronous
    run never killed."""
    cfg = _config(tmp_path, pattern_data, precision=precision)
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", KILL, cfg, moment, precision], env=clean_env(), stdout=out,
                              stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text() == "step00000004"
    assert manifest.problems(_tag(run, 4)) == []
    assert (_tag(run, 8) / manifest.MANIFEST).exists() == (moment == "latest")
    _train(cfg, precision)  # resumes at step 4 and writes step 8 again
    sync = synchronous(1, precision)
    assert _losses(run) == _losses(sync)
    optimizer_files = {n for n in _torch_files(_tag(run, STEPS)) if "optim_states" in n}
    assert optimizer_files == {f"{'bf16_' if precision == 'bf16' else ''}zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert all(manifest.problems(_tag(run, s)) == [] for s in SAVES)
    assert _torch_files(_tag(run, STEPS)) == _torch_files(_tag(sync, STEPS))
    assert [r["step"] for r in read_metrics(run) if r.get("event") == "checkpoint"] == list(SAVES)


@pytest.mark.launcher
@pytest.mark.parametrize("zero", [1, 2])
def test_two_ranks_resume_bit_exactly_from_asynchronous_tags(tmp_path, pattern_data, zero):
    """Data-parallel 2 under the deepspeed launcher: each rank writes its optimizer partition in its own
    background thread; every tag verifies, and a resume from step 4 trains steps 5-12 exactly as the run did."""
    cfg = _config(tmp_path, pattern_data, zero=zero)
    assert_ok(deepspeed_launch(2, ["megacpt", "train", cfg]))
    run = tmp_path / "run"
    straight = _losses(run)
    for step in SAVES:
        assert manifest.problems(_tag(run, step)) == []
        assert {n for n in _torch_files(_tag(run, step)) if "optim_states" in n} == {
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    final = _torch_files(_tag(run, STEPS))
    assert_ok(deepspeed_launch(2, ["megacpt", "train", cfg, "--set", "checkpoint.load_tag=step00000004"]))
    resumed = _losses(run)
    assert resumed == straight and sorted(resumed) == list(range(1, STEPS + 1))
    assert _torch_files(_tag(run, STEPS)) == final
    assert run_megacpt(["checkpoint", "verify", str(run)]).returncode == 0
