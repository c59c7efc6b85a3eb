"""The DeepSpeed engine around the megatron-core model: the derived config adapted to this machine, megacpt's
gated optimizer and parameter groups, `deepspeed.initialize`.
"""
from __future__ import annotations

import torch

from megacpt.config import ConfigError, RunConfig
from megacpt.runtime.deepspeed_config import derived_deepspeed_config, offloads_optimizer
from megacpt.runtime.optimizer import Gate, build_optimizer, parameter_groups


def deepspeed_config(config: RunConfig, data_parallel: int, load_universal: bool = False) -> dict:
    """The native DeepSpeed config for this run on this machine (fp32 where there is no GPU).

    `load_universal`: the engine loads a universal checkpoint (a ZeRO 1/2 resume on another layout)."""
    ds = _without_gpu_precision(derived_deepspeed_config(config, data_parallel))
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def _without_gpu_precision(ds: dict) -> dict:
    """Without CUDA: fp32, since DeepSpeed's bf16/fp16 engines need a GPU."""
    if torch.cuda.is_available():
        return ds
    for precision in ("bf16", "fp16"):
        if ds.get(precision, {}).get("enabled"):
            ds[precision] = {"enabled": False}
    return ds


# DeepSpeed's config sections (pydantic models) by the key of the `deepspeed` section they read
_DEEPSPEED_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedFP16Config": "fp16",
                       "DeepSpeedBF16Config": "bf16", "DeepSpeedCheckpointConfig": "checkpoint"}


def check_with_deepspeed(ds: dict) -> None:
    """DeepSpeed's own reading of the derived config (the keys megacpt passes through), before any process group
    exists: what it refuses is a ConfigError naming the key, not a traceback from every rank."""
    from megacpt.runtime.distributed import deepspeed_on_cpu

    if not torch.cuda.is_available():
        deepspeed_on_cpu()  # before DeepSpeed looks for an accelerator itself (and warns)
    from deepspeed.runtime.config import DeepSpeedConfig

    one_rank = {**ds, "train_batch_size": ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]}
    try:
        DeepSpeedConfig(one_rank)  # without a process group it checks the batch arithmetic of one data-parallel rank
    except ValueError as e:  # pydantic's ValidationError included
        errors = e.errors() if hasattr(e, "errors") else None
        if not errors:
            raise ConfigError("deepspeed", f"DeepSpeed refuses it: {e}") from None
        section = _DEEPSPEED_SECTIONS.get(e.title, e.title)
        key = ".".join(["deepspeed", section, *map(str, errors[0]["loc"])])
        raise ConfigError(key, f"DeepSpeed refuses it: {errors[0]['msg']} (got {errors[0]['input']!r})") from None
    except (AssertionError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError("deepspeed", f"DeepSpeed refuses it: {e}") from None


def universal_checkpoint_info(padded_vocab_size: int, gated_mlp: bool = False) -> dict:
    """What DeepSpeed's `ds_to_universal` needs to merge megacpt's tensor-parallel shards (saved with the model).

    Parameters matching no pattern (column-parallel QKV and fc1) concatenate on dim 0; a SwiGLU fc1
    (`gated_mlp`) is two sub-parameters, [gate; up], concatenated half by half. `original_vocab_size` is the
    padded size, so that the padding rows (trained: the output layer's softmax covers them) are kept.
    """
    from deepspeed.checkpoint import constants as c

    from megacpt.model import hf_mapping

    info = {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: [hf_mapping.REPLICATED_PATTERN],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [hf_mapping.ROW_PARALLEL_PATTERN],
        c.VOCABULARY_PARAMETER_PATTERNS: [hf_mapping.VOCAB_PATTERN],
        c.ORIGINAL_VOCAB_SIZE: padded_vocab_size,
    }
    if gated_mlp:
        info[c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0] = [hf_mapping.GATED_FC1_PATTERN]
    return info


def build_engine(config: RunConfig, world, scheduler_factory=None, load_universal: bool = False,
                 gate: Gate | None = None):
    """The megatron-core model of `config` inside its DeepSpeed engine: (engine, optimizer, scheduler).

    Training and `megacpt eval` both build it here, so their parameter groups and precision are the same. The
    model carries the `universal_checkpoint_info` that DeepSpeed saves with every checkpoint
    (checkpoint/elastic.py). `gate`: what decides each optimizer update (the loop's callbacks). With
    checkpoint.async_save its checkpoint engine is megacpt's BackgroundWriter (checkpoint/async_writer.py)."""
    from megacpt.checkpoint.async_writer import BackgroundWriter
    from megacpt.model.gpt import build_gpt
    from megacpt.model.hf_mapping import gated_mlp
    from megacpt.runtime.distributed import MegatronMPU

    model = build_gpt(config.model, config.padded_vocab_size, world.tensor_size,
                      activation_checkpointing=config.train.activation_checkpointing,
                      cpu_init=world.device.type == "cpu")
    model.universal_checkpoint_info = universal_checkpoint_info(config.padded_vocab_size, gated_mlp(config.model))
    ds = deepspeed_config(config, world.data_size, load_universal)
    engine, optimizer, scheduler = initialize(model, ds, scheduler_factory, MegatronMPU, gate)
    if config.checkpoint.async_save:  # DeepSpeed's checkpoint engine interface, writing from a host copy
        engine.checkpoint_engine = BackgroundWriter(engine._config)
    if config.train.compile:
        engine.compile()  # the module compiled in place (nn.Module.compile): its state dict keys stay the same
    return engine, optimizer, scheduler


def initialize(model: torch.nn.Module, ds: dict, scheduler_factory, mpu, gate: Gate | None = None):
    """deepspeed.initialize with megacpt's optimizer (built from the config's `optimizer` section, behind
    `gate`) and parameter groups; `scheduler_factory(optimizer)` builds the LR scheduler (None: no scheduler,
    as for evaluation)."""
    import deepspeed

    ds = dict(ds)
    params = ds.pop("optimizer")["params"]
    ds["zero_allow_untested_optimizer"] = True  # a subclass of torch's AdamW (runtime/optimizer.py)
    groups = parameter_groups(model, params["weight_decay"])
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds, lr_scheduler=scheduler_factory, mpu=mpu,
        optimizer=lambda groups: build_optimizer(groups, params, offloads_optimizer(ds), gate))
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
