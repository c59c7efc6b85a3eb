"""What may change when a run resumes its stage, and a clear refusal of everything else.

A resumed run continues the checkpoint's stage, so it must mean the same stage: the same samples in the same
order, the same LR for every step, the same model and optimizer. A key that would change that (sources,
weights, replay, seeds, batch size, sequence length, steps, the schedule, the model, precision, `init`) is
refused with both values and the way to get what was meant: a new stage. The keys in RESUMABLE only change
how the run is observed, evaluated or kept, or the layout (elastic.py converts the optimizer state); their
changes are returned so that the stage history records them.

`train.steps` is resumable: a stage may be lengthened (or shortened) on resume. The samples already trained
on stay the same (each batch's composition and each source's order depend only on the position in the
stream, not on its length) and the stage record says the new length; the schedule is laid out over the new
`train.steps` from the resumed step on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megacpt.config import RunConfig, dump_config, validate_config
from megacpt.errors import ConfigError, UserError
from megacpt.policy.stages import SavedConfig

# Dotted keys (and everything below them) that may differ between a checkpoint's config and its resume.
RESUMABLE = (
    "run_dir",  # the folder may have been moved or copied
    "train.steps",  # lengthening a stage keeps the samples trained so far (data/blend.py); the record says so
    "train.log_interval", "train.eval_interval", "train.eval_samples", "train.eval_position_bucket",
    "train.eval_batches", "train.save_interval",
    "train.max_skipped_steps", "train.spike",
    "train.micro_batch_size",  # the same samples per step, accumulated in other chunks (float rounding differs)
    "train.activation_checkpointing",  # recomputation gives the same numbers
    "train.compile",  # compiled kernels compute the same losses (to float rounding: tests/test_compile.py)
    "data.validation", "data.cache_dir",
    "checkpoint", "logging",
    # another layout: elastic.py converts the optimizer state through DeepSpeed's universal form
    "parallel.tensor", "deepspeed.zero_optimization.stage",
)
# Derived from train.* (compared there) or without effect on training.
_DEEPSPEED_IGNORED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print",
                      "wall_clock_breakdown")


def check_resume(config: RunConfig, saved_config: SavedConfig, tag_dir: Path, own_run: bool) -> dict[str, list]:
    """{key: [checkpoint value, config value]} for the resumable keys that changed; ConfigError for any other.

    `own_run`: the checkpoint is RUN_DIR's own (then `init` must not change either: it is ignored on resume).
    """
    current = comparable(config)
    saved = saved_config.model_dump(mode="json")
    try:
        before = comparable(validate_config(saved))
    except UserError:  # written by another schema version: compare what was written
        before = {**saved, "deepspeed": saved.get("deepspeed", {})}
    changes = {}
    # deepspeed.* last: its derived entries (batch size, LR) mirror train.* and schedule.*, which name the cause
    for key, (old, new) in sorted(diff(before, current).items(), key=lambda item: item[0].startswith("deepspeed.")):
        if _resumable(key, own_run):
            changes[key] = [None if old is _ABSENT else old, None if new is _ABSENT else new]
            continue
        raise ConfigError(key, f"the checkpoint {tag_dir} being resumed has {_show(old)}, this config "
                               f"{_show(new)}. A resume continues the checkpoint's stage and must not change "
                               f"which samples or which schedule it means; to train with the new value, start a new "
                               f"stage in another run_dir with init.checkpoint = {tag_dir} and init.mode 'new_stage'")
    if "train.steps" in changes:
        fractional = [k for k, points in config.data.schedules().items()
                      if any(isinstance(x, float) for x, _ in points)]
        if fractional:
            raise ConfigError("train.steps", f"the checkpoint {tag_dir} being resumed has {changes['train.steps'][0]}, "
                              f"this config {config.train.steps}; {fractional[0]} has steps given as fractions of "
                              "train.steps, so another length would change the mix of the steps already trained. Keep "
                              "train.steps, or give that schedule's steps as ints (optimizer steps)")
    return changes


def comparable(config: RunConfig) -> dict:
    """The resolved config with the effective DeepSpeed section (defaults filled) instead of the user's."""
    from megacpt.runtime.deepspeed_config import derived_deepspeed_config

    out = dump_config(config)
    ds = derived_deepspeed_config(config, 1)
    out["deepspeed"] = {k: v for k, v in ds.items() if k not in _DEEPSPEED_IGNORED}
    return out


def _resumable(key: str, own_run: bool) -> bool:
    allowed = RESUMABLE if own_run else RESUMABLE + ("init",)
    return any(key == a or key.startswith((a + ".", a + "[")) for a in allowed)


_ABSENT = object()


def diff(a: Any, b: Any, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (a's value, b's value)} for every leaf that differs (lists of equal length per item)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = {}
        for key in sorted(set(a) | set(b), key=str):
            out.update(diff(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = {}
        for i, (x, y) in enumerate(zip(a, b)):
            out.update(diff(x, y, f"{prefix}[{i}]"))
        return out
    return {} if a == b else {prefix: (a, b)}


def _show(value: Any) -> str:
    return "no value" if value is _ABSENT else json.dumps(value)
