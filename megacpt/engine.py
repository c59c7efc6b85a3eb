"""The DeepSpeed engine around the megatron-core model: derived DeepSpeed config, parameter groups, initialize.

The user's `deepspeed` section is passed through; megacpt fills what it derives (batch sizes, gradient
accumulation) and sensible defaults (AdamW 0.9/0.95/1e-8, weight decay 0.1 off biases and norms, clipping
1.0, ZeRO stage 0), and refuses DeepSpeed's own LR scheduler: megacpt's schedule owns the LR.
"""
from __future__ import annotations

import copy

import torch

from megacpt.config import ConfigError, RunConfig, batch_arithmetic

DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}


def deepspeed_config(config: RunConfig, data_parallel: int, load_universal: bool = False) -> dict:
    """The native DeepSpeed config for this run on this machine (fp32 where there is no GPU).

    `load_universal`: the engine loads a universal checkpoint (a ZeRO 1/2 resume on another layout)."""
    ds = _without_gpu_precision(derived_deepspeed_config(config, data_parallel))
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    if config.checkpoint.async_save:  # DeepSpeed's decoupled engine: a writer process per rank (checkpoint.py)
        writer = ds.setdefault("checkpoint", {}).setdefault("writer", {})
        writer.setdefault("type", "PYTHON")  # plain buffered writes; FAST needs DeepSpeed's compiled async_io op
        writer["decoupled"] = True
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _without_gpu_precision(ds: dict) -> dict:
    """Without CUDA: fp32, since DeepSpeed's bf16/fp16 engines need a GPU."""
    if torch.cuda.is_available():
        return ds
    for precision in ("bf16", "fp16"):
        if ds.get(precision, {}).get("enabled"):
            ds[precision] = {"enabled": False}
    return ds


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
    if "scheduler" in ds:
        raise ConfigError("deepspeed.scheduler",
                          "megacpt's 'schedule' section sets the LR; remove DeepSpeed's scheduler")
    optimizer = ds.setdefault("optimizer", copy.deepcopy(DEFAULT_OPTIMIZER))
    if str(optimizer.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError("deepspeed.optimizer.type", f"'{optimizer.get('type')}' is not supported; use AdamW")
    params = optimizer.setdefault("params", {})
    for key, value in DEFAULT_OPTIMIZER["params"].items():
        params.setdefault(key, value)
    params["lr"] = config.schedule.max_lr  # overwritten by the schedule before the first step
    if not _offloads_optimizer(ds):  # offloaded states keep DeepSpeed's own CPU Adam
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


def _offloads_optimizer(ds: dict) -> bool:
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") != "none"


def decays(ndim: int) -> bool:
    """Weight decay on matrices only; biases and LayerNorm parameters are not decayed (as in GPT-NeoX)."""
    return ndim >= 2


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The decayed parameters, then the others (the order their optimizer state is numbered in)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if decays(param.ndim) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(config: RunConfig, world, scheduler_factory=None, load_universal: bool = False):
    """The megatron-core model of `config` inside its DeepSpeed engine: (engine, optimizer, scheduler).

    Training and `megacpt eval` both build it here, so their parameter groups and precision are the same. The
    model carries the `universal_checkpoint_info` that DeepSpeed saves with every checkpoint (elastic.py)."""
    from megacpt.distributed import MegatronMPU
    from megacpt.elastic import universal_checkpoint_info
    from megacpt.model.gpt import build_gpt
    from megacpt.model.hf_mapping import gated_mlp

    model = build_gpt(config.model, config.padded_vocab_size, world.tensor_size,
                      activation_checkpointing=config.train.activation_checkpointing,
                      cpu_init=world.device.type == "cpu")
    model.universal_checkpoint_info = universal_checkpoint_info(config.padded_vocab_size, gated_mlp(config.model))
    ds = deepspeed_config(config, world.data_size, load_universal)
    return initialize(model, ds, scheduler_factory, MegatronMPU)


def initialize(model: torch.nn.Module, ds: dict, scheduler_factory, mpu):
    """deepspeed.initialize with megacpt's parameter groups; `scheduler_factory(optimizer)` builds the LR
    scheduler (None: no scheduler, as for evaluation)."""
    import deepspeed

    groups = parameter_groups(model, ds["optimizer"]["params"]["weight_decay"])
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds, lr_scheduler=scheduler_factory, mpu=mpu)
    _keep_fp32_grad_norm(engine)
    _skip_reduction_without_data_parallelism(engine)
    return engine, optimizer, scheduler


def _skip_reduction_without_data_parallelism(engine) -> None:
    """With one data-parallel rank and no ZeRO, DeepSpeed would still flatten every gradient into a buffer,
    all-reduce it over a group of one and copy it back after each backward: pure overhead, so turn it off."""
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False


def _keep_fp32_grad_norm(engine) -> None:
    """DeepSpeed's fp32 ZeRO-0 path computes the global gradient norm while clipping, then drops it, so
    `get_global_grad_norm()` would say None; keep it (the bf16/fp16/ZeRO paths record it themselves)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record
