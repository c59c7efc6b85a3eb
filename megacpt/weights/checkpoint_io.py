"""Checkpoint weights outside training: read a tag's weights as one full model, write weights-only tags.

The training loop saves and loads through the DeepSpeed engine (checkpoint.py). The tools (convert,
reshard, merge, generate) need the weights without an engine: every tensor-parallel shard of a tag merged
into one full megatron state dict, and new tags written in exactly the layout that DeepSpeed's
`load_checkpoint(load_module_only=True)` reads, so a following `megacpt train` stage loads them like any
checkpoint. Weights-only tags hold no optimizer state (`has_optimizer` false) and no RNG files. Outputs are
staged in a temporary sibling folder and renamed into place, so a failure never leaves partial output.
This module does not map names to or from Hugging Face (model/hf_mapping.py does).
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from megacpt.checkpoint import manifest, tags
from megacpt.config import ModelConfig, ParallelConfig, TokenizerConfig
from megacpt.errors import UserError
from megacpt.files import check_output, replace_durably
from megacpt.model import hf_mapping
from megacpt.model.hf_mapping import gated_mlp
from megacpt.policy.stages import CheckpointState, ModelSignature, read_state, write_state

MODEL_STATES = "mp_rank_{:02d}_model_states.pt"
# megatron's parallel linears carry an (empty) extra state that a strict load_state_dict expects.
_EXTRA_STATE_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")


@dataclass
class Checkpoint:
    """One tag of a megacpt checkpoint with its full (unsplit, vocab-padded) megatron weights."""

    tag_dir: Path
    state: CheckpointState
    weights: dict[str, torch.Tensor]

    @property
    def model(self) -> ModelConfig:
        return self.state.config.model

    @property
    def tensor_parallel(self) -> int:
        return self.state.model.tensor_parallel

    @property
    def padded_vocab_size(self) -> int:
        return padded_rows(self.weights)


def padded_rows(weights: dict[str, torch.Tensor]) -> int:
    """The padded vocabulary of full weights (the input embedding's rows: a tied model has no output layer)."""
    return weights["embedding.word_embeddings.weight"].shape[0]


def load(path: str | Path, key: str = "--checkpoint") -> Checkpoint:
    """A checkpoints folder (its `latest`) or a tag folder -> its state and full weights."""
    tag_dir = tags.open_tag(path, key=key)
    state = read_state(tag_dir)
    return Checkpoint(tag_dir, state, read_weights(tag_dir, state.config.model, state.model.tensor_parallel))


def read_weights(tag_dir: Path, model: ModelConfig, tensor_parallel: int) -> dict[str, torch.Tensor]:
    """Merge the `mp_rank_XX_model_states.pt` module of every TP rank (ZeRO 0/1/2 keep full weights there)."""
    files = [tag_dir / MODEL_STATES.format(rank) for rank in range(tensor_parallel)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"checkpoint {tag_dir} lacks {', '.join(missing)} (tensor parallel {tensor_parallel}); "
                        "ZeRO stage 3 checkpoints are not supported, consolidate them with DeepSpeed's zero_to_fp32.py")
    shards = []
    for file in files:
        try:
            module = torch.load(file, map_location="cpu", weights_only=True, mmap=True)["module"]
        except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
            raise UserError(f"cannot read the model weights in {file}: {e}") from None
        shards.append({name: t for name, t in module.items() if not name.endswith("._extra_state")})
    return hf_mapping.merge_shards(shards, gated_mlp=gated_mlp(model))


def check_tensor_parallel(model: ModelConfig, tensor_parallel: int) -> None:
    """The dimensions megatron splits must divide by the TP degree (whole key/value groups per rank)."""
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(model, name) % tensor_parallel:
            raise UserError(f"model {name} {getattr(model, name)} is not divisible by tensor parallel "
                            f"{tensor_parallel}")


def resize_vocab(weights: dict[str, torch.Tensor], padded: int) -> dict[str, torch.Tensor]:
    """Embedding and output rows grown with zeros or cut to `padded` (only padding rows are ever cut)."""
    out = dict(weights)
    for name in hf_mapping.VOCAB_ROWS:
        if name in weights:  # a tied model has no output layer
            out[name] = hf_mapping.pad_vocab(weights[name],
                                             padded) if padded >= weights[name].shape[0] else weights[name][:padded]
    return out


def module_state(weights: dict[str, torch.Tensor]) -> dict:
    """A megatron module state dict (weights plus the extra-state entries) that loads with strict=True."""
    out = dict(weights)
    for name in weights:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in _EXTRA_STATE_MODULES:
            out[f"{module}._extra_state"] = None
    return out


def build_model(model: ModelConfig, weights: dict[str, torch.Tensor], tensor_parallel: int, tensor_rank: int,
                device: torch.device):
    """This rank's megacpt model (fp32, eval mode) holding `weights`. Needs megatron's parallel state."""
    from megacpt.model.gpt import build_gpt

    gpt = build_gpt(model, padded_rows(weights), tensor_parallel)
    shard = hf_mapping.split_for_rank(weights, tensor_parallel, tensor_rank, gated_mlp=gated_mlp(model))
    gpt.load_state_dict(module_state(shard), strict=True)
    return gpt.to(device).eval()


def weights_only_state(source: CheckpointState, model: ModelConfig, tensor_parallel: int) -> CheckpointState:
    """`source` (a checkpoint's state) marked weights-only and re-signed for this TP degree."""
    config = source.config.model_copy(update={"model": model, "parallel": ParallelConfig(tensor=tensor_parallel)})
    return source.model_copy(update={"config": config, "model": ModelSignature.of(model, tensor_parallel),
                                     "has_optimizer": False})


def write(root: Path, weights: dict[str, torch.Tensor], state: CheckpointState, final_root: Path) -> Path:
    """A weights-only tag in checkpoints folder `root` (+ its `latest`), split for the state's TP degree.

    The tokenizer files the state names are copied into the tag, and the state points at them under
    `final_root`, where `root` will be renamed to: a checkpoint keeps its tokenizer when its sources go.
    """
    tp = state.model.tensor_parallel
    final_root = Path(final_root).absolute()
    tag_dir = root / tags.tag_name(state.step)
    tag_dir.mkdir(parents=True)
    for rank in range(tp):
        # The entries DeepSpeed's _load_checkpoint reads with load_module_only=True.
        shard = hf_mapping.split_for_rank(weights, tp, rank, gated_mlp=gated_mlp(state.config.model))
        torch.save({"module": module_state(shard), "dp_world_size": 1, "mp_world_size": tp},
                   tag_dir / MODEL_STATES.format(rank))
    tokenizer = _copy_tokenizer(state.tokenizer, tag_dir / "tokenizer", final_root / tag_dir.name / "tokenizer")
    write_state(tag_dir, state.model_copy(update={"tokenizer": tokenizer}))
    manifest.write_manifest(tag_dir, manifest.describe(tag_dir, manifest.tag_files(tag_dir)))
    (root / tags.LATEST).write_text(tag_dir.name)
    return tag_dir


HF_TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                           "added_tokens.json")


def tokenizer_files(section: TokenizerConfig | None) -> dict[str, Path]:
    """{name to copy it as: source file} for a tokenizer section; empty for none or 'byte'.

    An HF tokenizer is its tokenizer.json plus the companion files next to it (tokenizer_config.json names
    the eos token that tokenizer.json does not). Raises UserError when the main file is gone.
    """
    if section is None or section.type == "byte":
        return {}
    if section.type == "sentencepiece":
        main = Path(section.model)
        files = {main.name: main}
    else:
        main = Path(section.path)
        main = main / "tokenizer.json" if main.is_dir() else main
        files = {"tokenizer.json": main}
        files.update({name: main.parent / name for name in HF_TOKENIZER_COMPANIONS if (main.parent / name).is_file()})
    if not main.is_file():
        raise UserError(f"the tokenizer file {main} named in the checkpoint does not exist")
    return files


def checkpoint_tokenizer(state: CheckpointState):
    """The tokenizer a checkpoint's state names (megacpt.data.tokenizers.Tokenizer), or None."""
    from megacpt.data.tokenizers import build_tokenizer

    return None if state.tokenizer is None else build_tokenizer(state.tokenizer)


def _copy_tokenizer(section: TokenizerConfig | None, folder: Path, final_folder: Path) -> TokenizerConfig | None:
    """Copy the tokenizer's files into `folder`; the section rewritten to their paths in `final_folder`."""
    files = tokenizer_files(section)
    if not files:
        return section
    folder.mkdir()
    for name, source in files.items():
        shutil.copyfile(source, folder / name)
    main = next(iter(files))
    key = "model" if section.type == "sentencepiece" else "path"
    return section.model_copy(update={key: str(final_folder / main)})


def add_output_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--output and --overwrite, as every tool that writes a folder through `staged_output` takes them."""
    parser.add_argument("--output", required=True, metavar="DIR", help=f"{what} to create")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")


@contextmanager
def staged_output(output: str | Path, overwrite: bool, inputs: Sequence[str | Path]) -> Iterator[Path]:
    """Yield a temporary sibling of `output` to write into; rename it into place only if the block succeeds.
    `output` follows files.check_output: never one of the tool's `inputs` (checkpoints, folders it reads)."""
    check_output(output, "--output", overwrite, inputs)
    output = Path(output).absolute()
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} is a file, not a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder of the path should be, or no permission
        raise UserError(f"cannot create output {output}: {e.strerror} ({e.filename})") from None
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        replace_durably(staging, output)
        shutil.rmtree(old)
    else:
        replace_durably(staging, output)
