"""The native DeepSpeed config megacpt derives from a run config: the user's `deepspeed` section plus what megacpt
fills in (batch sizes, gradient accumulation) and its defaults (AdamW 0.9/0.95/1e-8, weight decay 0.1 off
biases and norms, clipping 1.0, ZeRO stage 0). The keys megacpt reads are checked with the config
(config.DeepSpeedSection, which also refuses DeepSpeed's own LR scheduler: megacpt's schedule owns the LR).
Pure dictionaries: no torch, no DeepSpeed (runtime/engine.py adapts the result to the machine).
"""
from __future__ import annotations

import copy

from megacpt.config import ConfigError, RunConfig, batch_arithmetic

DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}


def derived_deepspeed_config(config: RunConfig, data_parallel: int) -> dict:
    """The user's `deepspeed` section plus what megacpt derives and defaults (docs/CONFIG.md lists them)."""
    ds = copy.deepcopy(config.deepspeed)
    train = config.train
    accumulation = batch_arithmetic(train, data_parallel)
    derived = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
    }
    for key, value in derived.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"deepspeed.{key}",
                              f"is {ds[key]} but train.* gives {value}; set batch sizes in 'train' only")
        ds[key] = value
    optimizer = ds.setdefault("optimizer", copy.deepcopy(DEFAULT_OPTIMIZER))  # checked: config.DeepSpeedSection
    optimizer.setdefault("type", DEFAULT_OPTIMIZER["type"])
    params = optimizer.setdefault("params", {})
    for key, value in DEFAULT_OPTIMIZER["params"].items():
        params.setdefault(key, value)
    params["lr"] = config.schedule.max_lr  # overwritten by the schedule before the first step
    if not offloads_optimizer(ds):  # offloaded states keep DeepSpeed's own CPU Adam
        # torch's fused AdamW: one kernel on CPU and GPU alike, and no DeepSpeed op to JIT-compile with nvcc.
        params.setdefault("torch_adam", True)
        params.setdefault("fused", True)
    if "fp16" not in ds:
        ds.setdefault("bf16", {"enabled": True})  # on GPU; without one, `deepspeed_config` trains in fp32
    ds.setdefault("gradient_clipping", 1.0)
    ds.setdefault("zero_optimization", {"stage": 0})
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def offloads_optimizer(ds: dict) -> bool:
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") != "none"


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
