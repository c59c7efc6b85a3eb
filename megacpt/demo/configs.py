"""The demo's sizes and the run configs it writes: stage 0 on prose, then the stage-1 arms on code.

Plain dicts in the schema of megacpt/config.py, written to DIR/configs/ so that a user can rerun them with
`megacpt train`. Every arm has the same steps and batch (the same compute); they differ only in the schedule
and in replay, which is compute-equivalent (it takes a share of each batch, not extra steps). Every arm starts
from the cosine stage 0 except `infinite`, which has its own stage 0 (the same steps and data) with an
infinite schedule held at its constant LR, and continues it without a re-warm. The model is GPT-NeoX by
default, or with `arch` "llama" a Llama-style model of the same depth, width and parameter count (ARCHS).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megacpt.demo.corpora import CORPORA, corpus_path
from megacpt.run_dir import checkpoint_dir
from megacpt.sweep.grid import Axis, Sweep, SweepRun

ARMS = ("rewarm", "rewarm_replay", "constant", "infinite", "replay_schedule")
STAGE0 = "stage0"
STAGE0_INFINITE = "stage0_infinite"
REPLAY_FRACTION = 0.25  # Ibrahim et al.'s choice for a strong shift (Pile -> German); prose -> code is one
# replay_schedule: 50% of each batch at the start of stage 1, falling linearly to 10% at its end (a mixture
# schedule, docs/DATA.md): more replay while the re-warmed LR is high and forgetting fastest, less later.
REPLAY_SCHEDULE = [[0, 0.5], [1.0, 0.1]]
# The model fields each --arch adds to the size's depth and width. llama: RMSNorm, SwiGLU, no biases, full RoPE,
# grouped-query attention with 2 key/value groups of 3 heads; grouped-query attention saves 37% of the attention
# weights, which the MLP takes back: SwiGLU's three matrices of 600 give 2,563,776 parameters against NeoX's
# 2,566,272 at the full size (Shazeer 2020's rule of a gated MLP with the parameters of the plain one).
ARCHS = {"neox": {}, "llama": {"family": "llama", "num_query_groups": 2, "ffn_hidden_size": 600}}


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the model, the tokenizer, the steps and how often it evaluates."""

    corpus_chars: int | None  # cap on each corpus, None for all of it
    vocab_size: int
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    global_batch_size: int
    stage0_steps: int
    stage1_steps: int
    evals_per_stage: int
    eval_samples: int  # validation sequences per set per evaluation
    saves_per_stage: int  # checkpoints during a stage, so an interrupted stage resumes near where it stopped
    max_lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to 10% of the peak, as in both papers
    warmup: float = 0.05
    constant_lr_ratio: float = 0.1  # Gupta et al.'s constant baseline: 3e-5 against a 3e-4 peak
    infinite_const_ratio: float = 0.55  # Ibrahim et al.'s infinite schedules: const_lr 1.65e-4 against 3e-4
    infinite_cooldown_end: float = 0.6  # as in their 405M configs: cooldown to const_lr over warmup..60%
    infinite_constant_end: float = 0.9  # the infinite arm's stage 1 anneals over its last 10% of steps


FULL = DemoSize(corpus_chars=None, vocab_size=2048, num_layers=4, hidden_size=192, num_attention_heads=6,
                seq_length=128, global_batch_size=16, stage0_steps=300, stage1_steps=150, evals_per_stage=10,
                eval_samples=64, saves_per_stage=3)
QUICK = DemoSize(corpus_chars=1_000_000, vocab_size=2048, num_layers=4, hidden_size=192, num_attention_heads=6,
                 seq_length=128, global_batch_size=8, stage0_steps=120, stage1_steps=60, evals_per_stage=5,
                 eval_samples=16, saves_per_stage=1)


@dataclass(frozen=True)
class DemoPaths:
    """Where every file of a demo lives under its work directory."""

    root: Path

    @property
    def corpora(self) -> Path:
        return self.root / "corpora"

    def corpus(self, name: str, split: str) -> Path:
        return corpus_path(self.corpora, name, split)

    @property
    def tokenizer_prefix(self) -> Path:
        return self.root / "tokenizer" / "demo"

    def dataset(self, name: str, split: str) -> Path:
        return self.root / "data" / f"{name}_{split}"

    def config(self, run: str) -> Path:
        return self.root / "configs" / f"{run}.json"

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def stage1_run(arm: str) -> str:
    return f"stage1_{arm}"


def stage0_of(arm: str) -> str:
    """The stage-0 run an arm starts from."""
    return STAGE0_INFINITE if arm == "infinite" else STAGE0


def stage1_sweep(paths: DemoPaths, size: DemoSize, seed: int, arms: tuple[str, ...] = ARMS,
                 arch: str = "neox") -> Sweep:
    """The arms as a sweep over one axis, "arm": DIR/configs/stage1_ARM.json, DIR/runs/stage1_ARM, and the
    sweep's manifest and report, so `megacpt sweep --report DIR` reads a demo's work directory too."""
    runs = tuple(SweepRun(stage1_run(arm), {"arm": arm}, {"arm": arm}, stage1_config(paths, size, seed, arm, arch))
                 for arm in arms)
    return Sweep(paths.root, (Axis("arm", arms),), runs)


def _interval(steps: int, count: int) -> int:
    return max(steps // count, 1)


def _base(paths: DemoPaths, size: DemoSize, run: str, steps: int, seed: int, arch: str) -> dict:
    """What every run shares: model, tokenizer, validation on both corpora, loop settings."""
    return {
        "run_dir": str(paths.run_dir(run)),
        "model": {**ARCHS[arch], "num_layers": size.num_layers, "hidden_size": size.hidden_size,
                  "num_attention_heads": size.num_attention_heads, "seq_length": size.seq_length,
                  "vocab_size": size.vocab_size},
        "tokenizer": {"type": "sentencepiece", "model": f"{paths.tokenizer_prefix}.model"},
        "data": {
            "sources": [],
            "validation": [{"name": name, "prefix": str(paths.dataset(name, "val"))} for name in CORPORA],
            "seed": seed,
        },
        "train": {"steps": steps, "global_batch_size": size.global_batch_size,
                  "micro_batch_size": size.global_batch_size, "seed": seed, "log_interval": 1,
                  "eval_interval": _interval(steps, size.evals_per_stage), "eval_samples": size.eval_samples,
                  "save_interval": _interval(steps, size.saves_per_stage + 1) if size.saves_per_stage else 0},
        "checkpoint": {"keep_last": 1},
    }


def _source(paths: DemoPaths, name: str) -> dict:
    return {"name": name, "prefix": str(paths.dataset(name, "train"))}


def _cosine(size: DemoSize) -> dict:
    return {"style": "cosine", "max_lr": size.max_lr, "min_lr": size.max_lr * size.min_lr_ratio, "warmup": size.warmup}


def _infinite(size: DemoSize) -> dict:
    """Infinite cosine: warmup, cooldown to const_lr, then held there (constant_end 1: no anneal)."""
    return {**_cosine(size), "style": "infinite_cosine", "const_lr": size.max_lr * size.infinite_const_ratio,
            "cooldown_end": size.infinite_cooldown_end, "constant_end": 1.0}


def stage0_config(paths: DemoPaths, size: DemoSize, seed: int, name: str = STAGE0, arch: str = "neox") -> dict:
    """Pretraining on prose from random weights: warmup, then cosine to 10% of the peak; or, for the infinite
    arm's stage 0, the infinite schedule held at its constant LR."""
    config = _base(paths, size, name, size.stage0_steps, seed, arch)
    config["data"]["sources"] = [_source(paths, "prose")]
    config["schedule"] = _infinite(size) if name == STAGE0_INFINITE else _cosine(size)
    return config


def stage1_config(paths: DemoPaths, size: DemoSize, seed: int, arm: str, arch: str = "neox") -> dict:
    """One arm of stage 1 on code, from its stage 0's final weights as a new stage, optimizer state dropped."""
    config = _base(paths, size, stage1_run(arm), size.stage1_steps, seed, arch)
    config["data"]["sources"] = [_source(paths, "code")]
    if arm in ("rewarm_replay", "replay_schedule"):
        fraction = REPLAY_FRACTION if arm == "rewarm_replay" else REPLAY_SCHEDULE
        config["data"]["replay"] = {"fraction": fraction, "sources": [_source(paths, "prose")]}
    if arm == "constant":
        config["schedule"] = {"style": "constant", "max_lr": size.max_lr * size.constant_lr_ratio, "warmup": 0}
    elif arm in ("rewarm", "rewarm_replay", "replay_schedule"):
        config["schedule"] = _cosine(size)
    elif arm == "infinite":  # const_lr continued without warmup, then a geometric anneal to min_lr at the end
        config["schedule"] = {**_infinite(size), "rewarm": False, "warmup": 0,
                              "constant_end": size.infinite_constant_end}
    else:
        raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    config["init"] = {"checkpoint": str(checkpoint_dir(paths.run_dir(stage0_of(arm)))), "mode": "new_stage",
                      "load_optimizer": False, "load_scheduler": False, "load_data_position": False}
    return config
