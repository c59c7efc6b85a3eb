"""`megacpt extend-vocab --checkpoint CKPT --tokenizer NEW --output OUT`: grow a model for an extended tokenizer.

The tokenizer comes from `megacpt tokenizer extend` (docs/DATA.md): its first V pieces are the checkpoint's
tokenizer's, then come new ones (a SentencePiece .model, or a BPE tokenizer.json for a checkpoint with an
'hf' tokenizer, e.g. one converted from Llama 3 or Qwen2). The output is a weights-only checkpoint whose input
embedding and output layer (one matrix when they are tied) have a row for every new id, padded to a multiple
of 128 x the checkpoint's TP degree; every other tensor and every row of an old id is copied bit for bit, so
the logits of old ids on old-id inputs do not change. A new id's rows start as the mean of the rows of the
pieces the checkpoint's tokenizer splits the new piece's text into (`--init mean`, the usual choice), or
drawn from N(0, init_std^2) (`--init random`, for
comparison). The stage history gains a `VocabExtendedStage`; the next `megacpt train` stage sets
`model.vocab_size` to the new tokenizer's size (a model whose vocabulary already has unused rows, as
Qwen2's, keeps its size) and `tokenizer.model` / `tokenizer.path` to the new file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megacpt.config import TokenizerConfig, padded_vocab_size
from megacpt.data.bpe_extension import bpe_base_splits, check_bpe_extends, read_bpe, vocabulary
from megacpt.data.vocab_extension import base_splits, check_extends, read_sentencepiece
from megacpt.errors import UserError
from megacpt.model.hf_mapping import VOCAB_ROWS
from megacpt.policy.stages import VocabExtendedStage
from megacpt.weights import checkpoint_io


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoints folder (its `latest`) or one tag folder, with a SentencePiece or a "
                             "Hugging Face BPE tokenizer")
    parser.add_argument("--tokenizer", required=True, metavar="MODEL",
                        help="the extended SentencePiece .model or tokenizer.json (`megacpt tokenizer extend`)")
    parser.add_argument("--init", choices=("mean", "random"), default="mean",
                        help="new rows: mean of the rows of the base tokenizer's split of the piece (default), or "
                             "N(0, model.init_std^2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --init random (default 0)")
    checkpoint_io.add_output_arguments(parser, "checkpoints folder (one tag and `latest`)")


def run(args: argparse.Namespace) -> int:
    with checkpoint_io.staged_output(args.output, args.overwrite, [args.checkpoint, args.tokenizer]) as staging:
        source = checkpoint_io.load(args.checkpoint)
        old, new, splits, section = new_ids(source, Path(args.tokenizer), args.init == "mean")
        model = source.model.model_copy(update={"vocab_size": max(source.model.vocab_size, new)})
        padded = padded_vocab_size(model.vocab_size, source.tensor_parallel)
        rows = grown_rows(checkpoint_io.resize_vocab(source.weights, padded), old, splits, new - old,
                          model.init_std, args.seed)
        record = VocabExtendedStage(index=len(source.state.stages), name=Path(args.tokenizer).stem,
                                    checkpoint=str(source.tag_dir.resolve()), tokenizer=str(Path(args.tokenizer)),
                                    base_vocab_size=old, vocab_size=new, init=args.init)
        state = source.state.model_copy(update={"tokenizer": section, "stages": [*source.state.stages, record]})
        checkpoint_io.write(staging, rows, checkpoint_io.weights_only_state(state, model, source.tensor_parallel),
                            Path(args.output))
    print(f"wrote {args.output}: {source.tag_dir} with {new - old} new token rows ({old} -> {new} pieces, "
          f"--init {args.init}, padded vocabulary {padded}), weights only")
    return 0


def new_ids(source: checkpoint_io.Checkpoint, tokenizer: Path,
            mean: bool) -> tuple[int, int, list[list[int]] | None, TokenizerConfig]:
    """(first new id, ids of the extended tokenizer, the base ids each new row averages or None, the extended
    tokenizer's section), checked against the checkpoint's tokenizer; a UserError when it has none it can grow."""
    section = source.state.tokenizer
    if section is None or section.type == "byte":
        found = "no tokenizer" if section is None else f"a '{section.type}' tokenizer"
        raise UserError(f"checkpoint {source.tag_dir} has {found}; extend-vocab grows models trained with a "
                        "SentencePiece tokenizer or a Hugging Face BPE tokenizer.json")
    if section.type == "sentencepiece":
        base = read_sentencepiece(section.model, "the checkpoint's tokenizer")
        extended = read_sentencepiece(tokenizer, "--tokenizer")
        check_extends(base, extended, tokenizer)
        old, new = len(base.pieces), len(extended.pieces)
        splits = base_splits(base, [p.piece for p in extended.pieces[old:]]) if mean else None
        return old, new, splits, TokenizerConfig(type="sentencepiece", model=str(tokenizer.resolve()))
    base_file = checkpoint_io.tokenizer_files(section)["tokenizer.json"]
    base = read_bpe(base_file, "the checkpoint's tokenizer")
    check_bpe_extends(base, read_bpe(tokenizer, "--tokenizer"), tokenizer)
    old = max(vocabulary(base).values()) + 1
    new = max(vocabulary(read_bpe(tokenizer, "--tokenizer")).values()) + 1
    splits = bpe_base_splits(base_file, tokenizer, old, new - old) if mean else None
    return old, new, splits, TokenizerConfig(type="hf", path=str(tokenizer.resolve()))


def grown_rows(weights: dict[str, torch.Tensor], first_new: int, splits: list[list[int]] | None, count: int,
               init_std: float, seed: int) -> dict[str, torch.Tensor]:
    """`weights` with the embedding and output rows first_new .. first_new+count-1 initialised.

    splits[k] are the old ids whose rows average into new row k (`mean`); None draws N(0, init_std^2) rows.
    Rows of old ids and every other tensor are left as they are.
    """
    out = dict(weights)
    generator = torch.Generator().manual_seed(seed)
    for name in (n for n in VOCAB_ROWS if n in weights):  # a tied model has one matrix
        table = weights[name].clone()  # never write into the source (its tensors may map the checkpoint file)
        for k in range(count):
            if splits is None:
                row = torch.randn(table.shape[1], generator=generator) * init_std
            else:
                row = table[splits[k]].float().mean(dim=0)
            table[first_new + k] = row.to(table.dtype)
        out[name] = table
    return out
