"""`megacpt reshard --checkpoint DIR --tp N --output DIR`: the same weights at another tensor-parallel degree.

Weights only: optimizer state is laid out per TP and ZeRO partition and is not carried over, so the output
says `has_optimizer: false` and a following stage starts a fresh optimizer. The rest of the checkpoint's
state (config, tokenizer, stage history, schedule and data position) is kept. The vocabulary is re-padded
to a multiple of 128 x N: padding rows are appended as zeros or dropped, real rows never change.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megacpt.cli_helpers import positive_int
from megacpt.config import padded_vocab_size
from megacpt.tools import checkpoint_io


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoints folder (its `latest`) or one tag folder")
    parser.add_argument("--tp", required=True, type=positive_int, metavar="N",
                        help="the new tensor-parallel degree")
    checkpoint_io.add_output_arguments(parser, "checkpoints folder (one tag and `latest`)")


def run(args: argparse.Namespace) -> int:
    with checkpoint_io.staged_output(args.output, args.overwrite) as staging:
        source = checkpoint_io.load(args.checkpoint)
        model = source.model
        checkpoint_io.check_tensor_parallel(model, args.tp)
        weights = checkpoint_io.resize_vocab(source.weights, padded_vocab_size(model.vocab_size, args.tp))
        checkpoint_io.write(staging, weights, checkpoint_io.weights_only_state(source.state, model, args.tp),
                            Path(args.output))
    print(f"wrote {args.output}: {source.tag_dir} at tensor parallel {args.tp} (was {source.tensor_parallel}), "
          "weights only")
    return 0
