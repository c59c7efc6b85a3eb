"""What a `megacpt train` run will do, worked out from the config and the checkpoint alone.

`describe` answers the questions every stage transition raises (fresh, resume or new stage? which of
weights, Adam's moments and step count, the schedule position, the data position and the RNG come from the
checkpoint?) and the numbers that follow from them: the LRs of the first steps and the last, the samples per
source. It builds no model and no dataset and writes nothing: the LRs are `lr_at`, the samples the blend's
arithmetic. The train command prints it for `--dry-run`.
"""
from __future__ import annotations

from typing import Any

from megacpt.config import RunConfig
from megacpt.data.datasets import build_blend, continued_uses
from megacpt.policy.load_plan import LoadPlan, new_rows
from megacpt.schedule import lr_at

FRESH = ("weights", "optimizer_moments", "optimizer_step", "optimizer_hyperparameters", "schedule_position",
         "data_position", "rng")


def describe(config: RunConfig, plan: LoadPlan | None) -> dict[str, Any]:
    """The run's mode, what it inherits, its stage, LRs and samples per source (JSON-able)."""
    steps, batch = config.train.steps, config.train.global_batch_size
    mode = "fresh" if plan is None else "resume" if plan.resume else "new_stage"
    earlier = plan.state.stages if plan is not None else []
    stage_index = earlier[-1].index if mode == "resume" else len(earlier)
    first_t = plan.state.scheduler.t if plan is not None and plan.load_scheduler else 0
    position = plan.state.data.consumed_samples if plan is not None and plan.load_data_position else 0
    lrs = [lr_at(config.schedule, steps, t, stage_index) for t in range(steps)]
    end = position + (steps - first_t) * batch
    blend, names = build_blend(config.data, steps, batch, end)
    samples = blend.consumed_per_source(end) - blend.consumed_per_source(position)
    return {
        "mode": mode,
        "checkpoint": str(plan.tag_dir) if plan is not None else None,
        "stage_index": stage_index,
        "inherit": plan.inherits() if plan is not None else {key: False for key in FRESH},
        "steps": {"first": first_t, "last": steps - 1, "total": steps},
        "peak_lr": max(lrs),
        "first_lrs": [lrs[t] for t in range(first_t, min(first_t + 3, steps))],
        "last_lr": lrs[-1],
        "data_position": position,
        "samples": {name: int(n) for name, n in zip(names, samples)},
        "tokens": {name: int(n) * config.model.seq_length for name, n in zip(names, samples)},
        # the context of the checkpoint's model and of this stage's: a long-context stage changes them
        "context": {"checkpoint": _context(plan.state.config.model) if plan is not None else None,
                    "stage": _context(config.model)},
        # where a grown (extend-vocab) checkpoint's kept optimizer comes from: the checkpoint it grew
        "optimizer_from": str(plan.optimizer_tag) if plan is not None and plan.optimizer_tag else None,
        "freeze": _freeze(config, plan),
        "continued_sources": _continued(config, plan),
    }


def _context(model) -> dict[str, Any]:
    """The sequence length and RoPE settings of a model config."""
    return {"seq_length": model.seq_length, "rotary_base": model.rotary_base,
            "rope_scaling": model.rope_scaling.hf_dict() if model.rope_scaling else None}


def _continued(config: RunConfig, plan: LoadPlan | None) -> dict[str, int]:
    """data.continue_sources: {source: the sample of its stream it starts at} for the sources that continue."""
    if not config.data.continue_sources or plan is None:
        return {}
    earlier = plan.state.stages[:-1] if plan.resume else plan.state.stages
    return {name: use.stop for name, use in continued_uses(config.data, earlier, config.model.seq_length).items()}


def _freeze(config: RunConfig, plan: LoadPlan | None) -> dict[str, int] | None:
    """train.freeze: until which step only which token ids' rows train (None: everything trains)."""
    freeze = config.train.freeze
    rows = new_rows(plan.state.stages) if plan is not None else None
    if freeze is None or not freeze.steps or rows is None:
        return None
    return {"until_step": freeze.steps, "first_id": rows.start, "last_id": rows.stop - 1}


def format_text(summary: dict[str, Any]) -> str:
    """The summary as lines for a person."""
    inherit = summary["inherit"]
    source = f"from {summary['checkpoint']}" if summary["checkpoint"] else "from fresh weights"
    steps = summary["steps"]
    lines = [f"mode: {summary['mode']} {source}",
             f"stage {summary['stage_index']}: steps {steps['first']} .. {steps['last']} of {steps['total']}, "
             f"peak LR {summary['peak_lr']:.4g}",
             "inherited from the checkpoint: " + (", ".join(k for k, v in inherit.items() if v) or "nothing"),
             "fresh: " + (", ".join(k for k, v in inherit.items() if not v) or "nothing"),
             "LR of the first steps: " + ", ".join(f"{lr:.4g}" for lr in summary["first_lrs"])
             + f"; of the last step: {summary['last_lr']:.4g}",
             f"data: from sample {summary['data_position']} of the stream, samples per source: "
             + ", ".join(f"{k} {v}" for k, v in summary["samples"].items())]
    if summary["continued_sources"]:
        lines.append("data.continue_sources: " + ", ".join(f"{k} at sample {v} of its stream"
                                                            for k, v in summary["continued_sources"].items()))
    if summary["optimizer_from"]:
        lines.append(f"optimizer moments from {summary['optimizer_from']} (the checkpoint the vocabulary extension "
                     "grew; new rows start at zero)")
    if summary["freeze"]:
        freeze = summary["freeze"]
        lines.append(f"train.freeze: steps 1-{freeze['until_step']} train only the embedding and output rows of ids "
                     f"{freeze['first_id']}-{freeze['last_id']}")
    return "\n".join(lines)
