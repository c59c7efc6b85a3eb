"""`megacpt train CONFIG [--set key=value ...] [--dry-run [--json]]`: train one stage (trainer.py), or say what
it would do without building anything (dry_run.py)."""
from __future__ import annotations

import argparse
import json

from megacpt.cli_helpers import add_set_argument, positive_int
from megacpt.config import load_config
from megacpt.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="JSON run config")
    add_set_argument(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, build no model, write nothing; print what the run would do and what "
                             "it inherits from the checkpoint")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print it as one JSON object (last line)")
    parser.add_argument("--world-size", type=positive_int, default=None,
                        help="with --dry-run: check for a launcher world of this many processes (default: the "
                             "launcher's WORLD_SIZE, else one process)")


def run(args: argparse.Namespace) -> int:
    from megacpt.runtime.distributed import launcher_world_size
    from megacpt.train.stop_signals import STOPPED_BEFORE_TRAINING
    from megacpt.train.trainer import preflight, train

    config = load_config(args.config, args.overrides)
    if (args.json or args.world_size) and not args.dry_run:
        raise UserError(f"{'--json' if args.json else '--world-size'} is an option of --dry-run")
    if args.dry_run:
        from megacpt.train.dry_run import describe, format_text

        summary = describe(config, preflight(config, args.world_size or launcher_world_size()))
        print(json.dumps(summary) if args.json else format_text(summary))
        return 0
    return 0 if train(config) else STOPPED_BEFORE_TRAINING
