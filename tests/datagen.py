"""Small Megatron indexed datasets and run configs for tests, written with megatron-core's own builder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_indexed(prefix: str | Path, documents: list[list[int]], dtype=np.uint16) -> str:
    """PREFIX.bin/.idx holding `documents`, through megatron-core's IndexedDatasetBuilder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def pattern_documents(period: int, offset: int, num_docs: int, doc_len: int, vocab: int = 256) -> list[list[int]]:
    """Documents repeating a short token cycle: easy to learn, and distinct per (period, offset)."""
    cycle = [(offset + 7 * i) % vocab for i in range(period)]
    return [[cycle[(d + j) % period] for j in range(doc_len)] for d in range(num_docs)]


def random_documents(seed: int, num_docs: int, doc_len: int, vocab: int = 256) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, doc_len).tolist() for _ in range(num_docs)]


def tiny_config(run_dir: Path, sources: list[dict], **sections) -> dict:
    """A config for the 'tiny' preset (2 layers, hidden 64, seq 64, vocab 256) on the given sources."""
    config = {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny"},
        "data": {"sources": sources, "cache_dir": str(Path(run_dir).parent / "cache")},
        "schedule": {"style": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 2},
        "train": {"steps": 10, "global_batch_size": 4, "micro_batch_size": 2, "log_interval": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_config(path: Path, config: dict) -> str:
    path.write_text(json.dumps(config, indent=1))
    return str(path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def per_step(run_dir: str | Path) -> dict[int, dict]:
    """The training record of each step; a resume drops the records of the steps after its checkpoint, so a
    step logged twice is an error."""
    records = [r for r in read_metrics(run_dir) if "loss" in r and "event" not in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r for r in records}


def rewind_to(run_dir: Path, step: int) -> None:
    """Leave the checkpoint of `step` in charge, as if the run had been stopped right after saving it; the
    metrics go too, so that only what the resumed run logs is compared."""
    import shutil

    (run_dir / "metrics.jsonl").unlink()
    root = run_dir / "checkpoints"
    for tag in root.glob("step*"):
        if tag.name != f"step{step:08d}":
            shutil.rmtree(tag)
    (root / "latest").write_text(f"step{step:08d}")


def samples_trained(run_dir: str | Path) -> dict[str, int]:
    """Samples per source after the last training step (event records, a checkpoint's for one, follow it)."""
    return [r for r in read_metrics(run_dir) if "loss" in r and "event" not in r][-1]["samples"]


def trained_stage(index: int, run_dir: str | Path, steps_done: int, steps: int | None = None, **fields):
    """A TrainedStage record as `megacpt train` saves it; `fields` override the tiny defaults (batch 4 x 64 tokens,
    a cosine schedule, one source 'x')."""
    from megacpt.policy.stages import TrainedStage

    defaults = {"name": Path(run_dir).name, "init": None, "global_batch_size": 4, "seq_length": 64,
                "schedule": {"style": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup": 2},
                "data": {"sources": [{"name": "x", "prefix": "/data/x"}]}, "samples": {}}
    return TrainedStage(index=index, run_dir=str(run_dir), steps_done=steps_done, steps=steps or max(steps_done, 1),
                        **{**defaults, **fields})


def write_state(tag_dir: Path, step: int, tokens: int, stages: list) -> Path:
    """A checkpoint tag holding only megacpt_state.json (no weights): what the lineage walk reads of a checkpoint."""
    from megacpt.config import ModelConfig, ParallelConfig
    from megacpt.policy.stages import CheckpointState, ModelSignature, SavedConfig
    from megacpt.policy.stages import write_state as write

    model = ModelConfig(preset="tiny")
    tag_dir.mkdir(parents=True)
    write(tag_dir, CheckpointState(
        step=step, tokens=tokens, config=SavedConfig(model=model, parallel=ParallelConfig()),
        model=ModelSignature.of(model, 1), tokenizer=None, has_optimizer=False, stages=stages, scheduler=None,
        data=None))
    (tag_dir.parent / "latest").write_text(tag_dir.name)
    return tag_dir


def optimizer_file_state(tag_dir: Path, zero: int = 0) -> tuple[list[dict], list[tuple]]:
    """(param groups, [(flat fp32 params, exp_avg, exp_avg_sq, step) per group]) of a one-rank checkpoint."""
    import torch

    if zero == 0:
        saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
        optimizer = saved["optimizer"]
        params = [t for t in saved["module"].values() if torch.is_tensor(t)]  # in the order groups were built from
        flat = []
        for group in optimizer["param_groups"]:
            states = [optimizer["state"][i] for i in group["params"]]
            tensors = [t for t in params if (t.ndim >= 2) == (group["weight_decay"] > 0)]
            assert [t.shape for t in tensors] == [s["exp_avg"].shape for s in states]
            flat.append((torch.cat([t.flatten() for t in tensors]).float(),
                         torch.cat([s["exp_avg"].flatten() for s in states]),
                         torch.cat([s["exp_avg_sq"].flatten() for s in states]), float(states[0]["step"])))
        return optimizer["param_groups"], flat
    saved = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]
    base = saved["base_optimizer_state"]
    flat = []
    for i, group in enumerate(base["param_groups"]):
        state = base["state"][group["params"][0]]
        p = saved["single_partition_of_fp32_groups"][i]
        n = p.numel()
        flat.append((p, state["exp_avg"][:n], state["exp_avg_sq"][:n], float(state["step"])))
    return base["param_groups"], flat


def train_recording(monkeypatch, config_path: str) -> list[tuple[int, ...]]:
    """Run `megacpt train` in this process; the token rows of every micro-batch its loop trained on, in order."""
    from megacpt.cli import main
    from megacpt.train import loop as train

    rows, real = [], train.micro_batch_loss

    def recording(model, mb):
        rows.extend(tuple(row) for row in mb["tokens"].tolist())
        return real(model, mb)

    monkeypatch.setattr(train, "micro_batch_loss", recording)
    assert main(["train", config_path]) == 0
    monkeypatch.undo()
    return rows
