"""Find the checkpoint a run loads, verify it and read its state, then let the CPT policy decide what to take.

A run whose RUN_DIR holds a checkpoint resumes it (or the tag `checkpoint.load_tag` names); otherwise `init`
says which checkpoint to start from and how (policy/load_plan.py); otherwise the weights are fresh. Every
tag is verified against its manifest before its state is read. Imports neither torch nor DeepSpeed.
"""
from __future__ import annotations

from megacpt.checkpoint.tags import LATEST, is_complete, list_tags, open_tag, resolve_tag, verify_tag
from megacpt.config import RunConfig
from megacpt.errors import ConfigError, UserError
from megacpt.policy.load_plan import LoadPlan, check_schedule_link, grown_from, new_stage_plan, resume_plan
from megacpt.policy.stages import read_state
from megacpt.run_dir import checkpoint_dir


def plan_load(config: RunConfig, checksums: bool = True) -> LoadPlan | None:
    """The plan of a training run: resume RUN_DIR's own checkpoint if it has one, else follow `init`, else
    None (fresh weights). `checksums` false checks only the files' names and sizes."""
    own = checkpoint_dir(config.run_dir)
    load_tag = config.checkpoint.load_tag
    if load_tag is not None:
        tag_dir = own / load_tag
        if not tag_dir.is_dir():
            names = ", ".join(t.name for t in list_tags(own)) or "none"
            raise ConfigError("checkpoint.load_tag", f"{tag_dir} does not exist; the tags in {own}: {names}")
    elif (own / LATEST).is_file() or any(is_complete(t) for t in list_tags(own)):
        tag_dir = resolve_tag(own, key="run_dir")
    else:
        plan = plan_init(config, checksums=checksums)
        check_schedule_link(config, plan)
        return plan
    verify_tag(tag_dir, "checkpoint.load_tag" if load_tag else "run_dir", checksums)
    plan = resume_plan(config, tag_dir, read_state(tag_dir), own_run=True)
    check_schedule_link(config, plan)
    return plan


def plan_init(config: RunConfig, key: str = "init.checkpoint", checksums: bool = True) -> LoadPlan | None:
    """What `init` asks to load, ignoring RUN_DIR (`megacpt eval` loads weights this way too); `key` names
    the checkpoint's setting in messages."""
    init = config.init
    if init.checkpoint is None:
        return None
    tag_dir = open_tag(init.checkpoint, key=key, checksums=checksums)
    state = read_state(tag_dir)
    if init.mode == "resume":
        return resume_plan(config, tag_dir, state, own_run=False)
    source = grown_from(state) if init.load_optimizer else None
    if source is None:
        return new_stage_plan(config, tag_dir, state)
    try:
        grown_tag = open_tag(source, key="init.load_optimizer")
    except UserError as e:
        raise UserError(f"{e} (the checkpoint whose vocabulary {tag_dir} grew, where init.load_optimizer finds "
                        "Adam's moments)") from None
    return new_stage_plan(config, tag_dir, state, grown=(grown_tag, read_state(grown_tag)))
