"""Resume on another layout (elastic resume), under the real `deepspeed` launcher on CPU: a run saved at step 10
with one data-parallel size, tensor-parallel size or ZeRO stage continues at another, and its steps 11-20 agree
with the uninterrupted run on the original layout (fp32) on the same samples per source."""
import json

import pytest

from datagen import per_step, rewind_to, tiny_config, write_config
from launch import assert_ok, deepspeed_launch, run_megacpt

STEPS, SAVED_AT = 20, 10
TOLERANCE = 1e-5


# A Llama-style tiny model: SwiGLU (fc1 is [gate; up] under TP), two key/value groups, tied embeddings.
LLAMA = {"preset": "tiny", "family": "llama", "num_query_groups": 2, "tie_embeddings": True}


def _config(tmp_path, pattern_data, zero: int, tensor: int = 1, model: dict | None = None) -> str:
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"], "weight": 3},
                                            {"name": "noise", "prefix": pattern_data["noise"]}],
                         train={"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2,
                                "save_interval": SAVED_AT, "log_interval": 1},
                         parallel={"tensor": tensor}, deepspeed={"zero_optimization": {"stage": zero}},
                         model=model or {"preset": "tiny"})
    return write_config(tmp_path / f"zero{zero}_tp{tensor}.json", config)


def _train(processes: int, config: str):
    args = ["train", config]
    result = deepspeed_launch(processes, ["megacpt", *args]) if processes > 1 else run_megacpt(args)
    assert_ok(result)
    return result


def _resume(tmp_path, pattern_data, straight: dict, processes: int, zero: int, tensor: int = 1,
            model: dict | None = None) -> str:
    """Rewind RUN_DIR to step 10, resume it on this layout, check steps 11-20 against `straight`; the log."""
    rewind_to(tmp_path / "run", SAVED_AT)
    result = _train(processes, _config(tmp_path, pattern_data, zero, tensor, model))
    _check_continues(per_step(tmp_path / "run"), straight)
    return result.stderr


def _check_continues(resumed: dict, straight: dict) -> None:
    """Steps 11-20 agree with the uninterrupted run: losses to 1e-5, samples per source and LR exactly."""
    assert sorted(resumed) == list(range(SAVED_AT + 1, STEPS + 1))
    worst = max(abs(resumed[s]["loss"] - straight[s]["loss"]) for s in range(SAVED_AT + 1, STEPS + 1))
    assert worst <= TOLERANCE, [(resumed[s]["loss"], straight[s]["loss"]) for s in range(SAVED_AT + 1, STEPS + 1)]
    for step in range(SAVED_AT + 1, STEPS + 1):
        assert resumed[step]["samples"] == straight[step]["samples"]
        assert resumed[step]["lr"] == straight[step]["lr"]


def _straight(tmp_path, pattern_data, processes: int, zero: int, tensor: int = 1, model: dict | None = None) -> dict:
    """The uninterrupted 20-step run on the original layout (it saves at steps 10 and 20)."""
    _train(processes, _config(tmp_path, pattern_data, zero, tensor, model))
    return per_step(tmp_path / "run")


def _said(log: str, before: str, after: str) -> bool:
    return f"saved at {before}, this run is {after}: converted it to DeepSpeed's universal form" in log


@pytest.mark.launcher
def test_zero1_on_two_data_parallel_ranks_resumes_on_one(tmp_path, pattern_data):
    straight = _straight(tmp_path, pattern_data, 2, zero=1)
    log = _resume(tmp_path, pattern_data, straight, 1, zero=1)
    assert _said(log, "tensor 1 x data 2, ZeRO 1", "tensor 1 x data 1, ZeRO 1")
    assert (tmp_path / "run" / "checkpoints" / f"step{SAVED_AT:08d}" / "universal" / "zero").is_dir()


@pytest.mark.launcher
def test_zero0_on_one_rank_resumes_as_zero1_on_two_and_on_one(tmp_path, pattern_data):
    straight = _straight(tmp_path, pattern_data, 1, zero=0)
    log = _resume(tmp_path, pattern_data, straight, 2, zero=1)
    assert _said(log, "tensor 1 x data 1, ZeRO 0", "tensor 1 x data 2, ZeRO 1")
    log = _resume(tmp_path, pattern_data, straight, 1, zero=1)  # the step-10 tag's universal form is reused
    assert "ZeRO 0, this run is tensor 1 x data 1, ZeRO 1: loading its universal form from" in log
    # A layout that cannot be reached: exit 2 naming the checkpoint, no traceback.
    result = run_megacpt(["train", _config(tmp_path, pattern_data, zero=1),
                          "--set", "deepspeed.zero_optimization.stage=3"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "ZeRO stage 3 cannot load it on another layout" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.launcher
def test_tensor_parallel_2_resumes_at_1_as_zero0_and_as_zero1_and_from_reshard(tmp_path, pattern_data):
    straight = _straight(tmp_path, pattern_data, 2, zero=1, tensor=2)
    log = _resume(tmp_path, pattern_data, straight, 1, zero=0)
    assert _said(log, "tensor 2 x data 1, ZeRO 1", "tensor 1 x data 1, ZeRO 0")
    _resume(tmp_path, pattern_data, straight, 1, zero=1)
    # Offline: reshard the step-10 tag to TP 1 with its optimizer state, then resume the stage from it.
    tag = tmp_path / "run" / "checkpoints" / f"step{SAVED_AT:08d}"
    assert_ok(run_megacpt(["reshard", "--checkpoint", str(tag), "--tp", "1", "--output", str(tmp_path / "tp1")]))
    assert json.loads((tmp_path / "tp1" / tag.name / "megacpt_state.json").read_text())["has_optimizer"] is True
    config = json.loads((tmp_path / "zero1_tp1.json").read_text())
    config.update(run_dir=str(tmp_path / "from_reshard"), init={"checkpoint": str(tmp_path / "tp1"), "mode": "resume"})
    result = _train(1, write_config(tmp_path / "from_reshard.json", config))
    assert "holds its optimizer state in universal form only" in result.stderr
    _check_continues(per_step(tmp_path / "from_reshard"), straight)


@pytest.mark.launcher
def test_a_llama_at_tensor_parallel_2_resumes_at_1_as_zero0_and_as_zero1(tmp_path, pattern_data):
    """SwiGLU's fc1 holds [gate; up] of each rank's slice: the universal form joins the halves, not the ranks."""
    straight = _straight(tmp_path, pattern_data, 2, zero=1, tensor=2, model=LLAMA)
    log = _resume(tmp_path, pattern_data, straight, 1, zero=0, model=LLAMA)
    assert _said(log, "tensor 2 x data 1, ZeRO 1", "tensor 1 x data 1, ZeRO 0")
    _resume(tmp_path, pattern_data, straight, 1, zero=1, model=LLAMA)
