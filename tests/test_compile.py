"""`train.compile`: the compiled model trains as the eager one does, and its checkpoints are the eager model's files."""
import torch

from megacpt.cli import main

from datagen import read_metrics, tiny_config, write_config


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r and "event" not in r}


def _module_keys(run_dir, tag: str) -> list[str]:
    states = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    return sorted(states["module"])


def test_compiled_training_gives_the_eager_losses_and_the_same_checkpoints(tmp_path, pattern_data):
    """20 steps fp32 on the CPU, two micro-batches per step (gradient accumulation into the compiled backward's
    gradients), then the compiled run's step-10 checkpoint resumed without compiling."""
    runs = {}
    for compiled in (False, True):
        run_dir = runs[compiled] = tmp_path / f"compile_{compiled}"
        config = tiny_config(run_dir, [{"name": "a", "prefix": pattern_data["a"]}],
                             train={"steps": 20, "save_interval": 10, "compile": compiled})
        assert main(["train", write_config(tmp_path / f"compile_{compiled}.json", config)]) == 0
    eager, compiled = _losses(runs[False]), _losses(runs[True])
    assert sorted(compiled) == list(range(1, 21))
    assert max(abs(eager[t] - compiled[t]) for t in eager) <= 1e-4, (eager, compiled)
    assert compiled[20] < compiled[1] - 1.0  # it trained

    keys = _module_keys(runs[True], "step00000010")
    assert keys == _module_keys(runs[False], "step00000010")
    assert not any("_orig_mod" in key for key in keys)

    # the compiled run's checkpoint resumes in an eager run (and the other way round would read the same files)
    assert main(["train", str(tmp_path / "compile_True.json"), "--set", "checkpoint.load_tag=step00000010",
                 "--set", "train.compile=false"]) == 0
    resumed = _losses(runs[True])
    assert sorted(resumed) == list(range(1, 21))
    assert max(abs(resumed[t] - compiled[t]) for t in range(11, 21)) <= 1e-4, (resumed, compiled)
