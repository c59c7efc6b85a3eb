"""Load a checkpoint into a built engine (and scheduler and batch stream) as the load plan says
(policy/load_plan.py): the weights, and per the
plan Adam's state, through DeepSpeed, or through the tag's universal form when it was saved for another
layout (elastic.py); this rank's RNG on a resume.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megacpt.checkpoint import elastic
from megacpt.checkpoint.elastic import Layout
from megacpt.errors import UserError
from megacpt.policy.load_plan import LoadPlan
from megacpt.runtime.vocab_rows import zero_new_moments


def follow_layout(plan: LoadPlan, current: Layout, padded_vocab_size: int, is_main: bool) -> str | None:
    """Point the plan at the tag's universal form when its optimizer state is laid out for another world.

    Global rank 0 converts the tag once (every rank waits for it); returns what happened, for the log. A load
    without optimizer state needs nothing: DeepSpeed loads the weights of any data-parallel size or ZeRO stage.
    """
    if not plan.load_optimizer:
        return None
    tag_dir, state = plan.optimizer_source
    saved = elastic.saved_layout(tag_dir, state.model.tensor_parallel)
    grown = state.model.padded_vocab_size != padded_vocab_size  # rows added by a vocabulary extension
    if saved is not None and saved.loads_as(current) and not grown:
        return None
    if current.zero_stage > 2:
        raise UserError(f"checkpoint {tag_dir} was saved at {saved}; ZeRO stage 3 cannot load it on another "
                        "layout or vocabulary size: use ZeRO stage 0, 1 or 2, or the checkpoint's own layout")
    rows = min(state.model.padded_vocab_size, padded_vocab_size)
    outcome = [None]
    if is_main:
        try:
            outcome = [elastic.ensure_universal(tag_dir, saved, rows)[1]]
        except UserError as e:
            outcome = [str(e)]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        raise UserError(outcome[0])
    plan.universal = tag_dir / elastic.UNIVERSAL
    done = "converted it to DeepSpeed's universal form in" if outcome[0] else "loading its universal form from"
    saved_as = f"was saved at {saved}" if saved else "holds its optimizer state in universal form only"
    now = f"{current}, {padded_vocab_size} vocabulary rows (it has {state.model.padded_vocab_size})" if grown \
        else str(current)
    return f"checkpoint {tag_dir.name} {saved_as}, this run is {now}: {done} {plan.universal}"


# Param-group entries that a loaded optimizer state may set: the parameters themselves, and ZeRO's step count.
_LOADED_GROUP_KEYS = ("params", "step")


def load_into_engine(engine, plan: LoadPlan, world) -> None:
    """Load the weights (and, per the plan, the optimizer) through DeepSpeed; restore this rank's RNG on resume.

    A kept optimizer brings Adam's moments and step counts, never its hyperparameters: torch's (and ZeRO's)
    `load_state_dict` replaces every param group with the saved one, betas, eps and weight decay included,
    so the groups this stage's config built are put back afterwards (the LR is the schedule's anyway).
    From a universal form, ZeRO 1/2 engines load through DeepSpeed (configured with `load_universal`), ZeRO 0
    ones through elastic.py; the RNG files then belong to other ranks, so dropout draws anew.
    """
    groups = engine.basic_optimizer.param_groups  # evaluation builds the same engine, optimizer included
    configured = [{k: v for k, v in group.items() if k not in _LOADED_GROUP_KEYS} for group in groups]
    if plan.universal is not None and engine.zero_optimization_stage() == 0:
        elastic.load_unpartitioned(engine, plan.universal, world.tensor_rank, world.tensor_size)
    else:
        _load_through_deepspeed(engine, plan)
    if plan.optimizer_tag is not None:  # the optimizer came with the grown checkpoint's weights: take the new ones
        _load_weights(engine, plan.tag_dir, world.tensor_rank)
        zero_new_moments(engine, plan.new_rows, world.tensor_rank)
    # a load replaces the param group dicts
    for group, hyperparameters in zip(engine.basic_optimizer.param_groups, configured, strict=True):
        group.update(hyperparameters)
    rng_file = plan.tag_dir / f"rng_rank{world.rank}.pt"
    if plan.resume and plan.universal is None and rng_file.is_file():
        set_rng_states(torch.load(rng_file, weights_only=True))


def _load_weights(engine, tag_dir: Path, tensor_rank: int) -> None:
    """The weights of `tag_dir` into a loaded engine, the fp32 master copy of a ZeRO/bf16 optimizer included."""
    saved = torch.load(tag_dir / elastic.MODEL_STATES.format(tensor_rank), map_location="cpu", weights_only=False)
    engine.module.load_state_dict(saved["module"], strict=True)
    if engine.optimizer is not engine.basic_optimizer:
        engine.optimizer.refresh_fp32_params()


def _load_through_deepspeed(engine, plan: LoadPlan) -> None:
    where = plan.universal or plan.optimizer_source[0]
    path, _ = engine.load_checkpoint(
        str(where.parent), tag=where.name, load_module_strict=True,
        load_optimizer_states=plan.load_optimizer, load_lr_scheduler_states=False,
        load_module_only=not plan.load_optimizer)
    if path is None:
        raise UserError(f"DeepSpeed found no checkpoint files in {where}")


def set_rng_states(states: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(states["cpu"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def restore(plan: LoadPlan | None, engine, scheduler, stream, world) -> int:
    """Load what the plan says into the engine, the LR scheduler and the batch stream; returns the tokens the
    model has seen. The schedule, not a loaded optimizer, then sets the LR of every param group."""
    if plan is not None:
        load_into_engine(engine, plan, world)
        if plan.load_scheduler:
            scheduler.load_state_dict(plan.state.scheduler.model_dump(mode="json"))
        if plan.load_data_position:
            stream.load_state_dict(plan.state.data.model_dump())
    scheduler.apply()
    return plan.state.tokens if plan is not None else 0
