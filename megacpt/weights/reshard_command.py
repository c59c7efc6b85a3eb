"""`megacpt reshard --checkpoint DIR --tp N --output DIR`: the same checkpoint at another tensor-parallel degree.

The weights are split for N ranks (the model files every tool and a following stage read). A training
checkpoint's optimizer state travels too, in DeepSpeed's universal form (TAG/universal, see
megacpt/checkpoint/elastic.py), so the output resumes with Adam's state at any layout (`init.mode: resume`); with
`--weights-only`, or from a checkpoint without optimizer state, the output says `has_optimizer: false` and a
following stage starts a fresh optimizer. The rest of the checkpoint's state (config, tokenizer, stage
history, schedule and data position) is kept. The vocabulary is re-padded to a multiple of 128 x N: padding
rows are appended as zeros or dropped, real rows never change.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megacpt.checkpoint import elastic
from megacpt.cli_helpers import positive_int
from megacpt.config import padded_vocab_size
from megacpt.weights import checkpoint_io


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoints folder (its `latest`) or one tag folder")
    parser.add_argument("--tp", required=True, type=positive_int, metavar="N",
                        help="the new tensor-parallel degree")
    parser.add_argument("--weights-only", action="store_true", help="leave the optimizer state behind")
    checkpoint_io.add_output_arguments(parser, "checkpoints folder (one tag and `latest`)")


def run(args: argparse.Namespace) -> int:
    with checkpoint_io.staged_output(args.output, args.overwrite, [args.checkpoint]) as staging:
        source = checkpoint_io.load(args.checkpoint)
        model = source.model
        checkpoint_io.check_tensor_parallel(model, args.tp)
        padded = padded_vocab_size(model.vocab_size, args.tp)
        weights = checkpoint_io.resize_vocab(source.weights, padded)
        state = checkpoint_io.weights_only_state(source.state, model, args.tp)
        optimizer = source.state.has_optimizer and not args.weights_only
        tag_dir = checkpoint_io.write(staging, weights, state.model_copy(update={"has_optimizer": optimizer}),
                                      Path(args.output))
        if optimizer:
            saved = elastic.saved_layout(source.tag_dir, source.tensor_parallel)
            elastic.write_universal(source.tag_dir, saved, min(source.padded_vocab_size, padded),
                                    tag_dir / elastic.UNIVERSAL)
    what = "weights and optimizer state (universal form)" if optimizer else "weights only"
    print(f"wrote {args.output}: {source.tag_dir} at tensor parallel {args.tp} (was {source.tensor_parallel}), {what}")
    return 0
