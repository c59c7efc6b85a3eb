"""`megacpt passkey --checkpoint DIR`: synthetic passkey retrieval at chosen depths of a long prompt.

For models big enough to learn it: a small model retrieves nothing, and then the answer loss with the key
next to the control's (without it) still shows whether the key's tokens became likelier. One process; the
checkpoint's tokenizer encodes the prompts (megacpt.evaluation.passkey has the prompt and the scores).
"""
from __future__ import annotations

import argparse
import json

from megacpt.cli_helpers import add_overwrite_argument, closed_fraction, positive_int, text_table
from megacpt.errors import UserError
from megacpt.files import check_output, write_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoints folder (its `latest`) or one tag folder")
    parser.add_argument("--length", type=positive_int, metavar="N",
                        help="prompt tokens (default: the model's seq_length)")
    parser.add_argument("--depths", type=closed_fraction, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        metavar="D", help="where the key sentence sits in the filler, 0 (start) to 1 (end)")
    parser.add_argument("--trials", type=positive_int, default=10, metavar="N", help="keys per depth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON (refused if FILE exists)")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from megacpt.evaluation.passkey import passkey_table
    from megacpt.runtime.distributed import setup_world
    from megacpt.weights import checkpoint_io

    if args.json:
        check_output(args.json, "--json", args.overwrite, [args.checkpoint])  # before the work
    source = checkpoint_io.load(args.checkpoint)
    tokenizer = checkpoint_io.checkpoint_tokenizer(source.state)
    if tokenizer is None:
        raise UserError(f"--checkpoint {source.tag_dir}: the checkpoint names no tokenizer, and the passkey prompts "
                        "are text; train with a `tokenizer` section")
    length = args.length or source.model.seq_length
    world = setup_world(1, seed=0)
    model = checkpoint_io.build_model(source.model, source.weights, 1, 0, world.device)
    vocab = source.model.vocab_size

    def logits(ids, positions):
        return model(ids, positions, None)[..., :vocab]

    try:
        rows = passkey_table(logits, tokenizer.encode, length, args.depths, args.trials, args.seed, world.device)
    except ValueError as e:
        raise UserError(f"--length {length}: {e}") from None
    print(f"passkey retrieval, {args.trials} keys per depth, prompts of up to {length} tokens "
          f"(model trained at {source.model.seq_length}): {source.tag_dir}")
    print(text_table([[r["depth"], f"{r['retrieved']:.0%}", f"{r['answer_loss']:.3f}",
                       f"{r['answer_loss_without_key']:.3f}"] for r in rows],
                     ["depth", "retrieved", "answer loss", "without key"]))
    if args.json:
        report = {"checkpoint": str(source.tag_dir), "length": length, "trials": args.trials, "seed": args.seed,
                  "depths": rows}
        write_output(args.json, json.dumps(report, indent=1) + "\n", "--json", args.overwrite, [args.checkpoint])
    return 0
