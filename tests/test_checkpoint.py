"""Checkpoints for continual pretraining: bit-exact resume after kill -9 and SIGTERM, new stages that keep or
drop Adam's moments, atomic saves, architecture checks, non-finite steps."""
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from megacpt.checkpoint import manifest
from megacpt.cli import main
from megacpt.errors import UserError
from megacpt.policy.stages import STATE_FILE, read_state
from megacpt.run_dir import LOCK, OWNER
from megacpt.train.stop_signals import STOPPED_BEFORE_TRAINING

from datagen import optimizer_file_state, per_step, read_metrics, tiny_config, write_config
from launch import (
    assert_ok,
    deepspeed_launch,
    free_port,
    kill_9_after,
    run_megacpt,
    start_held,
    start_process,
    wait_for_step,
)

BETA1, BETA2 = 0.9, 0.95


def _config(tmp_path, name, pattern_data, **sections) -> dict:
    sections.setdefault("train", {})
    sections["train"] = {"steps": 40, "global_batch_size": 8, "micro_batch_size": 2, "save_interval": 10,
                         "log_interval": 1, **sections["train"]}
    sections.setdefault("model", {"preset": "tiny", "dropout": 0.1})  # resume must restore the dropout RNGs too
    return tiny_config(tmp_path / name, [{"name": "a", "prefix": pattern_data["a"], "weight": 3},
                                         {"name": "noise", "prefix": pattern_data["noise"]}], **sections)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pattern_data):
    tmp_path = tmp_path_factory.mktemp("straight")
    assert_ok(run_megacpt(["train", write_config(tmp_path / "c.json", _config(tmp_path, "run", pattern_data))]))
    return per_step(tmp_path / "run")


def test_kill_9_then_rerun_is_bit_exact(tmp_path, pattern_data, uninterrupted):
    cfg = write_config(tmp_path / "c.json", _config(tmp_path, "run", pattern_data))
    killed_at = kill_9_after(tmp_path / "run", 13, [sys.executable, "-m", "megacpt", "train", cfg])
    assert killed_at < 40
    assert_ok(run_megacpt(["train", cfg]))
    resumed = per_step(tmp_path / "run")
    assert sorted(resumed) == list(range(1, 41))
    for step in range(1, 41):
        assert resumed[step]["loss"] == uninterrupted[step]["loss"], step
        assert resumed[step]["samples"] == uninterrupted[step]["samples"]
        assert resumed[step]["lr"] == uninterrupted[step]["lr"]


def test_kill_9_then_rerun_is_bit_exact_for_a_llama_style_model(tmp_path, pattern_data):
    """The same for the Llama family: RMSNorm, SwiGLU, two key/value groups, tied embeddings, dropout."""
    model = {"preset": "tiny", "family": "llama", "num_query_groups": 2, "tie_embeddings": True, "dropout": 0.1}
    straight = _config(tmp_path, "straight", pattern_data, model=model, train={"steps": 20, "save_interval": 5})
    assert_ok(run_megacpt(["train", write_config(tmp_path / "straight.json", straight)]))
    cfg = write_config(tmp_path / "c.json", _config(tmp_path, "run", pattern_data, model=model,
                                                    train={"steps": 20, "save_interval": 5}))
    killed_at = kill_9_after(tmp_path / "run", 8, [sys.executable, "-m", "megacpt", "train", cfg])
    assert killed_at < 20
    assert_ok(run_megacpt(["train", cfg]))
    resumed, expected = per_step(tmp_path / "run"), per_step(tmp_path / "straight")
    assert sorted(resumed) == list(range(1, 21))
    assert [resumed[s]["loss"] for s in range(1, 21)] == [expected[s]["loss"] for s in range(1, 21)]


def test_sigterm_saves_the_current_step_and_exits_0_then_the_rerun_continues(tmp_path, pattern_data, uninterrupted):
    cfg = write_config(tmp_path / "c.json", _config(tmp_path, "run", pattern_data, train={"save_interval": 0}))
    proc = start_process([sys.executable, "-m", "megacpt", "train", cfg])
    wait_for_step(tmp_path / "run", 5, proc)
    os.kill(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    last = max(per_step(tmp_path / "run"))
    assert last < 40 and (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"step{last:08d}"
    assert_ok(run_megacpt(["train", cfg]))
    resumed = per_step(tmp_path / "run")
    assert [resumed[s]["loss"] for s in range(1, 41)] == [uninterrupted[s]["loss"] for s in range(1, 41)]


def _kill_during_save(run_dir: Path, cfg: str, tag: str, moment: str, delay: float) -> bool:
    """Start the run, SIGKILL it `delay` s after `moment` (a file or folder of `tag`) appears; True if the tag
    was still incomplete (no megacpt_state.json) when the kill landed."""
    proc = start_process([sys.executable, "-m", "megacpt", "train", cfg])
    target = run_dir / "checkpoints" / tag / moment
    try:
        while not target.exists():
            assert proc.poll() is None, f"the run ended before {target} appeared:\n{proc.stdout.read()[-3000:]}"
            time.sleep(0.002)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        return not (run_dir / "checkpoints" / tag / STATE_FILE).exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sigkill_while_a_checkpoint_is_written_resumes_from_a_complete_one_bit_exact(tmp_path, pattern_data):
    """A 1.7M-parameter model with ZeRO-1 (model and optimizer files, ~27 MB a tag), killed during three saves
    at different moments: when the tag folder appears, when its optimizer file appears, and 50 ms after its
    model file appears. After each kill `latest` names a complete tag; the re-runs resume from it and the
    losses of every step equal the uninterrupted run's."""
    def config(name: str) -> str:
        raw = _config(tmp_path, name, pattern_data,
                      train={"steps": 12, "save_interval": 3, "global_batch_size": 2, "micro_batch_size": 2},
                      model={"num_layers": 2, "hidden_size": 256, "num_attention_heads": 8, "ffn_hidden_size": 1024,
                             "seq_length": 64, "vocab_size": 256, "dropout": 0.1},
                      deepspeed={"zero_optimization": {"stage": 1}})
        return write_config(tmp_path / f"{name}.json", raw)

    assert_ok(run_megacpt(["train", config("straight")]))
    run_dir, cfg = tmp_path / "run", config("run")
    incomplete = []
    for tag, moment, delay in (("step00000006", "", 0.0),
                               ("step00000009", "zero_pp_rank_0_mp_rank_00_optim_states.pt", 0.0),
                               ("step00000012", "mp_rank_00_model_states.pt", 0.05)):
        incomplete.append(_kill_during_save(run_dir, cfg, tag, moment, delay))
        latest = (run_dir / "checkpoints" / "latest").read_text()
        assert (run_dir / "checkpoints" / latest / STATE_FILE).is_file(), (tag, moment)
        assert read_state(run_dir / "checkpoints" / latest).step < int(tag[4:]) or not incomplete[-1]
    assert any(incomplete), "no kill landed inside a save"
    assert_ok(run_megacpt(["train", cfg]))
    resumed, straight = per_step(run_dir), per_step(tmp_path / "straight")
    assert sorted(resumed) == list(range(1, 13))
    assert [resumed[s]["loss"] for s in range(1, 13)] == [straight[s]["loss"] for s in range(1, 13)]
    assert resumed[12]["samples"] == straight[12]["samples"]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the run-dir lock's note of its holder (every start rewrites it)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (LOCK, OWNER)}


def test_a_stop_during_startup_ends_the_run_before_its_first_step_and_writes_nothing(tmp_path, pattern_data):
    """A stop sent while `megacpt train` starts (before its handler exists; the launch scripts hold it pending)
    is honoured before the first step: exit 75 (STOPPED_BEFORE_TRAINING: nothing trained, not a finished run),
    and the run dir is left byte for byte as it was (a fresh run's is not created), fresh or resumed, config.json
    and metrics.jsonl included (so the next run continues as if nothing had happened: the kill -9 test above)."""
    cfg = write_config(tmp_path / "c.json", _config(tmp_path, "run", pattern_data, train={"save_interval": 2}))
    run_dir = tmp_path / "run"
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # a fresh run
        proc = start_held(["train", cfg])
        os.kill(proc.pid, sig)
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == STOPPED_BEFORE_TRAINING == 75, output[-3000:]
        assert "before step 1, the first of this run: no step trained, nothing new to save; exiting with status 75 " \
               "(run it again)" in output
        assert not run_dir.exists()  # the start created it and trained no step: it leaves nothing behind
    kill_9_after(run_dir, 3, [sys.executable, "-m", "megacpt", "train", cfg])
    before = _files(run_dir)
    proc = start_held(["train", cfg, "--set", "train.log_interval=2"])  # a resumed run, with a change it may make
    os.kill(proc.pid, signal.SIGUSR1)
    output = proc.communicate(timeout=300)[0]
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert proc.returncode == STOPPED_BEFORE_TRAINING, output[-3000:]
    assert f"before step {int(latest.removeprefix('step')) + 1}, the first of this run" in output
    assert _files(run_dir) == before  # not even config.json, nor the records of steps after the checkpoint


@pytest.mark.launcher
def test_kill_9_then_rerun_is_bit_exact_under_the_launcher(tmp_path, pattern_data):
    cfg = write_config(tmp_path / "c.json",
                       _config(tmp_path, "run", pattern_data, train={"steps": 16, "save_interval": 6}))
    straight_cfg = write_config(tmp_path / "s.json",
                                _config(tmp_path, "straight", pattern_data, train={"steps": 16, "save_interval": 6}))
    assert_ok(deepspeed_launch(2, ["megacpt", "train", straight_cfg]))
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    kill_9_after(tmp_path / "run", 8, [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                                       "megacpt", "train", cfg])
    assert_ok(deepspeed_launch(2, ["megacpt", "train", cfg]))
    resumed, straight = per_step(tmp_path / "run"), per_step(tmp_path / "straight")
    assert sorted(resumed) == list(range(1, 17))
    assert [resumed[s]["loss"] for s in range(1, 17)] == [straight[s]["loss"] for s in range(1, 17)]
    assert resumed[16]["samples"] == straight[16]["samples"]


def _adam_state(tag_dir: Path) -> dict:
    """Adam's state from a ZeRO-0 DeepSpeed checkpoint: {param index: {step, exp_avg, exp_avg_sq}}."""
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    return saved["optimizer"]["state"]


@pytest.fixture(scope="module")
def stage0(tmp_path_factory, pattern_data):
    tmp_path = tmp_path_factory.mktemp("stage0")
    config = _config(tmp_path, "stage0", pattern_data, train={"steps": 5, "save_interval": 0})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    return tmp_path / "stage0" / "checkpoints"


@pytest.mark.parametrize("load_optimizer", [False, True])
def test_new_stage_keeps_or_drops_adams_moments(tmp_path, pattern_data, stage0, load_optimizer):
    config = _config(tmp_path, "stage1", pattern_data, train={"steps": 1},
                     schedule={"style": "constant", "max_lr": 1e-3, "warmup": 0},
                     init={"checkpoint": str(stage0), "mode": "new_stage", "load_optimizer": load_optimizer})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    before = _adam_state(stage0 / "step00000005")
    after = _adam_state(tmp_path / "stage1" / "checkpoints" / "step00000001")
    for index, state in after.items():
        m0 = before[index]["exp_avg"] if load_optimizer else torch.zeros_like(state["exp_avg"])
        v0 = before[index]["exp_avg_sq"] if load_optimizer else torch.zeros_like(state["exp_avg_sq"])
        grad = (state["exp_avg"] - BETA1 * m0) / (1 - BETA1)  # the one gradient of this stage's step
        torch.testing.assert_close(state["exp_avg_sq"], BETA2 * v0 + (1 - BETA2) * grad**2, rtol=1e-4, atol=1e-10)
        assert float(state["step"]) == (6 if load_optimizer else 1)
    if not load_optimizer:  # after one step from zero moments, exp_avg is exactly (1 - beta1) x grad
        first = after[0]
        assert not torch.equal(first["exp_avg"], before[0]["exp_avg"])
    history = read_state(tmp_path / "stage1" / "checkpoints" / "step00000001").stages
    assert [s.index for s in history] == [0, 1] and history[0].steps_done == 5


def test_new_stage_restarts_the_schedule_and_the_data(tmp_path, pattern_data, stage0):
    config = _config(tmp_path, "stage1", pattern_data, train={"steps": 3},
                     schedule={"style": "constant", "max_lr": 1e-4, "min_lr": 0.0, "warmup": 2},
                     init={"checkpoint": str(stage0 / "step00000005"), "mode": "new_stage"})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    records = per_step(tmp_path / "stage1")
    assert [records[s]["lr"] for s in (1, 2, 3)] == pytest.approx([5e-5, 1e-4, 1e-4], abs=0)
    assert records[3]["samples"] == {"a": 18, "noise": 6} and records[3]["stage"] == 1


def test_crash_during_a_save_leaves_latest_at_a_complete_checkpoint(tmp_path, pattern_data, monkeypatch):
    config = _config(tmp_path, "run", pattern_data, train={"steps": 6, "save_interval": 3})
    cfg = write_config(tmp_path / "c.json", config)
    real_write = manifest.write_manifest

    def crash_before_the_second_manifest(tag_dir, files):
        if tag_dir.name == "step00000006":
            raise RuntimeError("crash (injected)")
        real_write(tag_dir, files)

    monkeypatch.setattr(manifest, "write_manifest", crash_before_the_second_manifest)
    with pytest.raises(RuntimeError):
        main(["train", cfg])
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step00000003"
    unfinished = root / "step00000006"
    assert (unfinished / "megacpt_state.json").exists() and not (unfinished / "manifest.json").exists()
    assert main(["train", cfg]) == 0  # resumes from step 3, replaces the unfinished tag and finishes
    assert (root / "latest").read_text() == "step00000006"
    assert (root / "step00000006" / "manifest.json").exists()


def test_keep_last_removes_older_tags_after_the_new_one_is_complete(tmp_path, pattern_data):
    config = _config(tmp_path, "run", pattern_data, train={"steps": 8, "save_interval": 2}, checkpoint={"keep_last": 2})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    tags = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000006", "step00000008"]


@pytest.mark.parametrize("change, words", [
    ({"model": {"preset": "tiny", "hidden_size": 128}}, ["hidden_size: checkpoint 64 vs config 128"]),
])
def test_loading_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, pattern_data, stage0, capsys, change,
                                                                       words):
    config = _config(tmp_path, "stage1", pattern_data, init={"checkpoint": str(stage0)}, **change)
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 2
    err = capsys.readouterr().err
    assert str(stage0) in err and "Traceback" not in err
    for word in words:
        assert word in err


def test_another_tensor_parallel_degree_without_optimizer_state_points_to_reshard(tmp_path, pattern_data, stage0):
    """A world of one refuses tensor parallel 2 before any checkpoint is read (preflight's world check), so the
    architecture check is called as a run of two ranks would reach it."""
    from megacpt.config import validate_config
    from megacpt.policy.load_plan import check_architecture
    from megacpt.policy.stages import read_state

    config = validate_config(_config(tmp_path, "stage1", pattern_data, init={"checkpoint": str(stage0)},
                                     parallel={"tensor": 2}))
    tag = stage0 / (stage0 / "latest").read_text().strip()
    with pytest.raises(UserError) as error:
        check_architecture(config, read_state(tag), tag)
    assert "tensor_parallel: checkpoint 1 vs config 2" in str(error.value) and "reshard" in str(error.value)


def test_load_optimizer_from_weights_without_optimizer_state_is_refused(tmp_path, pattern_data, stage0, capsys):
    state_file = stage0 / "step00000005" / "megacpt_state.json"
    state = json.loads(state_file.read_text())
    fake = tmp_path / "converted" / "step00000005"
    fake.mkdir(parents=True)
    (fake / "megacpt_state.json").write_text(json.dumps({**state, "has_optimizer": False}))
    manifest.write_manifest(fake, manifest.describe(fake, manifest.tag_files(fake)))
    config = _config(tmp_path, "stage1", pattern_data, init={"checkpoint": str(fake), "load_optimizer": True})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 2
    assert "init.load_optimizer" in capsys.readouterr().err


def test_diverging_run_skips_non_finite_steps_then_stops_keeping_the_last_good_checkpoint(tmp_path, pattern_data,
                                                                                          capsys):
    config = _config(tmp_path, "run", pattern_data,
                     train={"steps": 30, "save_interval": 2, "max_skipped_steps": 3},
                     schedule={"style": "constant", "max_lr": 1e6, "warmup": 0},
                     deepspeed={"gradient_clipping": 0.0})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 2
    assert "consecutive steps" in capsys.readouterr().err
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    assert train[-1]["skipped_steps"] == 3
    good = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    assert read_state(tmp_path / "run" / "checkpoints" / good).step < train[-1]["step"]


def _overflow_on(monkeypatch, calls: set[int]) -> None:
    """DeepSpeed's fp16 overflow path, which this CPU cannot run in fp16: on the given optimizer-step calls the
    optimizer sets `overflow` and leaves the weights alone, as DeepSpeed's fp16 optimizers do, and the engine
    then skips the LR scheduler's step. Wrapped outside the step guard, as the fp16 optimizer wraps it."""
    from megacpt.train.step_guard import StepGuard

    real_init = StepGuard.__init__

    def init(self, optimizer, *args, **kwargs):
        real_init(self, optimizer, *args, **kwargs)
        guarded, count = optimizer.step, [0]

        def step(*a, **k):
            count[0] += 1
            optimizer.overflow = count[0] in calls
            return None if optimizer.overflow else guarded(*a, **k)

        optimizer.step = step

    monkeypatch.setattr(StepGuard, "__init__", init)


def test_fp16_overflow_steps_consume_their_batch_and_count_as_skipped(tmp_path, pattern_data, monkeypatch):
    """Steps 3 and 4 overflow: every step 1..8 is logged once at its own LR, the stage reads exactly 8 global
    batches, and the two steps count as skipped."""
    from megacpt.config import ScheduleConfig
    from megacpt.schedule import lr_at

    schedule = {"style": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 2}
    config = _config(tmp_path, "run", pattern_data, train={"steps": 8, "save_interval": 0}, schedule=schedule)
    _overflow_on(monkeypatch, {3, 4})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    train = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["lr"] for r in train] == [lr_at(ScheduleConfig(**schedule), 8, t) for t in range(8)]
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert sum(train[-1]["samples"].values()) == 8 * 8
    state = read_state(tmp_path / "run" / "checkpoints" / "step00000008")
    assert state.step == 8 and state.scheduler.t == 8 and state.data.consumed_samples == 8 * 8


def test_consecutive_fp16_overflows_stop_with_a_clear_message(tmp_path, pattern_data, monkeypatch, capsys):
    config = _config(tmp_path, "run", pattern_data, train={"steps": 8, "save_interval": 0, "max_skipped_steps": 3})
    _overflow_on(monkeypatch, set(range(1, 9)))
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 2
    err = capsys.readouterr().err
    assert "3 consecutive steps up to step 3" in err and "fp16 overflow" in err
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_kept_optimizer_takes_moments_from_the_checkpoint_and_hyperparameters_from_the_config(tmp_path, pattern_data,
                                                                                             zero):
    ds = {"zero_optimization": {"stage": zero}}
    stage0 = _config(tmp_path, "stage0", pattern_data, train={"steps": 3, "save_interval": 0}, deepspeed=ds)
    assert main(["train", write_config(tmp_path / "s0.json", stage0)]) == 0
    betas, eps, decay, lr = (0.8, 0.99), 1e-6, 0.05, 1e-3
    stage1 = _config(tmp_path, "stage1", pattern_data, train={"steps": 1},
                     schedule={"style": "constant", "max_lr": lr, "warmup": 0},
                     init={"checkpoint": str(tmp_path / "stage0" / "checkpoints"), "load_optimizer": True},
                     deepspeed={**ds,
                                "optimizer": {"type": "AdamW",
                                              "params": {"betas": list(betas), "eps": eps, "weight_decay": decay}}})
    assert main(["train", write_config(tmp_path / "s1.json", stage1)]) == 0
    _, before = optimizer_file_state(tmp_path / "stage0" / "checkpoints" / "step00000003", zero)
    groups, after = optimizer_file_state(tmp_path / "stage1" / "checkpoints" / "step00000001", zero)
    assert [(tuple(g["betas"]), g["eps"], g["weight_decay"], g["lr"]) for g in groups] == \
        [(betas, eps, decay, lr), (betas, eps, 0.0, lr)]
    for (p0, m0, v0, step0), (p1, m1, v1, step1), wd in zip(before, after, (decay, 0.0)):
        assert (step0, step1) == (3, 4)  # the step count continues
        grad = (m1 - betas[0] * m0) / (1 - betas[0])  # this stage's one gradient, if beta1 is the new one
        torch.testing.assert_close(v1, betas[1] * v0 + (1 - betas[1]) * grad**2, rtol=1e-4, atol=1e-12)
        # AdamW with this stage's LR, weight decay and eps, bias-corrected for step 4
        update = (m1 / (1 - betas[0] ** 4)) / ((v1 / (1 - betas[1] ** 4)).sqrt() + eps)
        torch.testing.assert_close(p1, p0 * (1 - lr * wd) - lr * update, rtol=1e-5, atol=1e-7)
