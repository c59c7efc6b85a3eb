"""Resume on another layout: a checkpoint saved at one tensor-parallel size, data-parallel size and ZeRO
stage continues at another, with its weights and Adam's state.

The go-between is DeepSpeed's universal checkpoint: one folder per parameter holding the full (unsplit,
unpartitioned) fp32 weight, Adam's two moments and its step, each with the dimension tensor parallelism splits
it along. Every model megacpt saves carries the `universal_checkpoint_info` that says how (the regular
expressions of model/hf_mapping.py), so DeepSpeed's own `ds_to_universal` converts a ZeRO 1/2 checkpoint and
the engine's `checkpoint.load_universal` loads the result into ZeRO 1/2 at any layout. DeepSpeed covers only
those: with ZeRO 0 (in fp32) the optimizer is plain torch AdamW, whose state `ds_to_universal` cannot read
and `load_universal` cannot fill, so this module writes and reads the same universal files for ZeRO 0 itself.

The universal form of a tag lives in TAG/universal, written once (staged, then renamed) by global rank 0.
The vocabulary keeps its padding rows while the padded size allows it (a change of data parallelism alone is
exact); a tensor-parallel change that shrinks the padding cuts padding rows, one that grows it adds zero rows.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from megacpt.checkpoint.save import write_failure_reason
from megacpt.errors import UserError
from megacpt.files import replace_durably
from megacpt.model import hf_mapping

UNIVERSAL = "universal"
MARKER = "megacpt_universal.json"  # written last: the universal form is complete
MODEL_STATES = "mp_rank_{:02d}_model_states.pt"
ZERO_FILES = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"  # one per data-parallel rank (bf16_ prefix too)
FP32_ONLY = ("ZeRO stage 0 keeps Adam's state inside DeepSpeed's mixed-precision wrapper, which megacpt cannot "
             "re-lay out; use ZeRO stage 1 or 2 (in both runs) to change the layout in bf16/fp16")


@dataclass(frozen=True)
class Layout:
    """How a run's weights and optimizer state are laid out over its processes."""

    tensor: int
    data: int
    zero_stage: int

    def loads_as(self, other: Layout) -> bool:
        """Whether DeepSpeed loads a checkpoint of this layout into `other` directly: the same tensor parallelism
        and ZeRO stage, and, where ZeRO partitions Adam's state over the data-parallel ranks, the same number."""
        return (self.tensor, self.zero_stage) == (other.tensor, other.zero_stage) and (
            self.zero_stage == 0 or self.data == other.data)

    def __str__(self) -> str:
        return f"tensor {self.tensor} x data {self.data}, ZeRO {self.zero_stage}"


def saved_layout(tag_dir: Path, tensor_parallel: int) -> Layout | None:
    """The layout of a tag's optimizer state, read from DeepSpeed's files (ZeRO 1/2 write one optimizer file per
    data-parallel rank, ZeRO 0 keeps it in the model file); None when the tag holds none of its own (written by
    `megacpt reshard`, its universal form holds it)."""
    model_file = tag_dir / MODEL_STATES.format(0)
    try:
        saved = torch.load(model_file, map_location="cpu", weights_only=False, mmap=True)
        zero_files = sorted(tag_dir.glob(ZERO_FILES))
        if not zero_files:
            return Layout(tensor_parallel, int(saved["dp_world_size"]), 0) if saved.get("optimizer") else None
        optimizer = torch.load(zero_files[0], map_location="cpu", weights_only=False, mmap=True)
        stage = int(optimizer["optimizer_state_dict"].get("zero_stage", 1))
    except (OSError, RuntimeError, KeyError, EOFError) as e:
        raise UserError(f"cannot read the layout of checkpoint {tag_dir}: {e}") from None
    if stage > 2:
        raise UserError(f"checkpoint {tag_dir} is a ZeRO stage {stage} checkpoint, which megacpt cannot resume on "
                        "another layout; resume it with the same world and ZeRO stage")
    return Layout(tensor_parallel, len(zero_files), stage)


def ensure_universal(tag_dir: Path, saved: Layout | None, vocab_rows: int) -> tuple[Path, bool]:
    """TAG/universal for a model with `vocab_rows` embedding and output rows, converted now unless it exists.

    Returns the folder and whether it was converted now. Call on one process only.
    """
    folder = tag_dir / UNIVERSAL
    rows = universal_vocab_rows(folder)
    if saved is None:
        if rows is None or rows > vocab_rows:
            raise UserError(f"checkpoint {tag_dir} holds its optimizer state only in universal form "
                            f"({'missing' if rows is None else f'{rows} vocabulary rows'}), which does not fit "
                            f"this model's {vocab_rows} rows: reshard the original checkpoint to this tensor "
                            "parallel size")
        return folder, False
    if rows == vocab_rows:
        return folder, False
    write_universal(tag_dir, saved, vocab_rows, folder)
    return folder, True


def universal_vocab_rows(folder: Path) -> int | None:
    """The vocabulary rows of a complete universal form (None: there is none)."""
    marker = folder / MARKER
    return json.loads(marker.read_text())["vocab_rows"] if marker.is_file() else None


def write_universal(tag_dir: Path, saved: Layout | None, vocab_rows: int, folder: Path) -> None:
    """Write `folder` (staged beside it, then renamed into place) with the universal form of the tag."""
    staging_root = folder.parent.parent / f".{folder.parent.name}.{folder.name}-{os.getpid()}"
    shutil.rmtree(staging_root, ignore_errors=True)
    staging = staging_root / UNIVERSAL
    try:
        staging_root.mkdir()
        if saved is None:
            if universal_vocab_rows(tag_dir / UNIVERSAL) is None:
                raise UserError(f"checkpoint {tag_dir} has neither optimizer state of its own nor a complete "
                                f"{UNIVERSAL} folder")
            shutil.copytree(tag_dir / UNIVERSAL, staging)
        elif saved.zero_stage:
            _convert_zero(tag_dir, staging)
        else:
            _convert_unpartitioned(tag_dir, staging, saved.tensor)
        _fit_vocab_rows(staging / "zero", vocab_rows)
        (staging / MARKER).write_text(json.dumps({"from": str(saved or tag_dir), "vocab_rows": vocab_rows}))
        shutil.rmtree(folder, ignore_errors=True)
        replace_durably(staging, folder)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError of its zip writer
        if isinstance(e, RuntimeError) and "inline_container" not in str(e):
            raise
        reason = write_failure_reason(e, folder.parent)
        raise UserError(f"cannot write the universal form of checkpoint {tag_dir} beside it: {reason}; make room "
                        "there or make it writable, or convert it where you can write with `megacpt reshard "
                        "--checkpoint TAG --tp N --output DIR` and load that") from None
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


def _convert_zero(tag_dir: Path, output: Path) -> None:
    """DeepSpeed's `ds_to_universal`, in this process (its progress output is swallowed).

    Its input is the tag's DeepSpeed files only (optimizer shards linked, not copied), the model files without
    megatron's empty `_extra_state` entries, which the converter would take for weights."""
    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    from megacpt.runtime.engine import universal_checkpoint_info

    source = output.parent / "input"
    source.mkdir()
    for file in tag_dir.glob("*_optim_states.pt"):
        try:
            os.link(file, source / file.name)
        except OSError:  # another filesystem
            shutil.copyfile(file, source / file.name)
    model_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    for file in model_files:
        saved = torch.load(file, map_location="cpu", weights_only=False)
        saved["module"] = {n: t for n, t in saved["module"].items() if not n.endswith("._extra_state")}
        padded = saved["module"]["embedding.word_embeddings.weight"].shape[0] * len(model_files)
        saved.setdefault(UNIVERSAL_CHECKPOINT_INFO, universal_checkpoint_info(padded))  # saved before megacpt did
        torch.save(saved, source / file.name)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(output), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
    except (AssertionError, ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(f"DeepSpeed cannot convert checkpoint {tag_dir} to its universal form: {e!r}") from None


def _convert_unpartitioned(tag_dir: Path, output: Path, tensor_parallel: int) -> None:
    """The universal files of a ZeRO 0 checkpoint: each TP rank's model file holds its weights and the torch
    AdamW state dict, whose parameters are numbered as engine.parameter_groups orders them."""
    from deepspeed.checkpoint import constants as c
    from deepspeed.git_version_info import version

    files = [torch.load(tag_dir / MODEL_STATES.format(r), map_location="cpu", weights_only=False)
             for r in range(tensor_parallel)]
    optimizers = [f.get("optimizer") for f in files]
    if any(o is None or "state" not in o for o in optimizers):
        raise UserError(f"checkpoint {tag_dir}: {FP32_ONLY}")
    shards = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
    gated = bool(files[0].get(c.UNIVERSAL_CHECKPOINT_INFO, {}).get(c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0))
    steps = []
    for saved, optimizer in zip(files, optimizers):
        weights = {n: t for n, t in saved["module"].items() if not n.endswith("._extra_state")}
        names = optimizer_order({n: t.ndim for n, t in weights.items()})
        states = {names[i]: s for i, s in optimizer["state"].items()}
        shards["fp32"].append({n: t.float() for n, t in weights.items()})
        for key in ("exp_avg", "exp_avg_sq"):
            shards[key].append({n: s[key] for n, s in states.items()})
        steps += [s["step"] for s in states.values()]
    zero = output / "zero"
    for key, per_rank in shards.items():
        for name, full in hf_mapping.merge_shards(per_rank, gated_mlp=gated).items():
            dim = hf_mapping.tensor_parallel_dim(name)
            entry = {c.PARAM: full, c.CAT_DIM: dim or 0}
            if re.match(hf_mapping.VOCAB_PATTERN, name):
                entry[c.VOCAB_TENSOR] = True
            if gated and re.match(hf_mapping.GATED_FC1_PATTERN, name):
                entry[c.PARAM_N_SUB_PARAMS] = 2
            (zero / name).mkdir(parents=True, exist_ok=True)
            torch.save(entry, zero / name / f"{key}.pt")
            if key == "fp32" and steps:
                torch.save(steps[0], zero / name / "step.pt")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizers[0]["param_groups"]]
    torch.save({c.DS_VERSION: version, c.PARAM_GROUPS: groups}, zero / "optimizer_state.pt")
    for rank, saved in enumerate(files):  # DeepSpeed reads the client state next to the zero/ folder
        torch.save({k: v for k, v in saved.items() if k != "optimizer"}, output / MODEL_STATES.format(rank))


def optimizer_order(ndims: dict[str, int]) -> list[str]:
    """Parameter names in the order engine.parameter_groups hands them to the optimizer: decayed (matrices)
    first, then the rest, each in model order."""
    from megacpt.runtime.optimizer import decays

    return [n for n, d in ndims.items() if decays(d)] + [n for n, d in ndims.items() if not decays(d)]


def _fit_vocab_rows(zero: Path, rows: int) -> None:
    """Embedding and output layer rows cut or zero-padded to `rows` in every state (only padding changes)."""
    from deepspeed.checkpoint import constants as c

    for name in hf_mapping.VOCAB_ROWS:
        for file in (zero / name).glob("*.pt"):
            if file.name == "step.pt":
                continue
            entry = torch.load(file, weights_only=False)
            entry[c.PARAM] = fit_rows(entry[c.PARAM], rows)
            torch.save(entry, file)


def fit_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its leading dimension cut or zero-padded to `rows`."""
    return tensor[:rows] if tensor.shape[0] >= rows else hf_mapping.pad_vocab(tensor, rows)


def load_unpartitioned(engine, folder: Path, tensor_rank: int, tensor_size: int) -> None:
    """Fill a ZeRO 0 fp32 engine (weights, Adam's moments and step) from universal files, as DeepSpeed's
    `load_universal` does for ZeRO 1/2: each parameter's full tensors, padded and split for this rank."""
    from deepspeed.checkpoint import constants as c

    optimizer = engine.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer) or optimizer is not engine.basic_optimizer:
        raise UserError(FP32_ONLY)
    zero = folder / "zero"

    def shard(name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        entry = torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=False)
        full = entry[c.PARAM]
        if name in hf_mapping.VOCAB_ROWS:
            full = fit_rows(full, like.shape[0] * tensor_size)
        part = hf_mapping.split_for_rank({name: full}, tensor_size, tensor_rank,
                                         gated_mlp=entry.get(c.PARAM_N_SUB_PARAMS, 1) == 2)[name]
        if part.shape != like.shape:
            raise UserError(f"{zero / name / key}.pt holds shape {tuple(full.shape)}, which does not split into "
                            f"this model's {tuple(like.shape)} at tensor parallel {tensor_size}")
        return part.to(like.device, like.dtype)

    names = {p: n for n, p in engine.module.named_parameters()}
    state = {}
    index = 0
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = names[param]
                param.copy_(shard(name, "fp32", param))
                state[index] = {"step": torch.load(zero / name / "step.pt", weights_only=False),
                                "exp_avg": shard(name, "exp_avg", param),
                                "exp_avg_sq": shard(name, "exp_avg_sq", param)}
                index += 1
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
