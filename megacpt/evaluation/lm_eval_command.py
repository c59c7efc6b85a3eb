"""`megacpt lm-eval --checkpoint DIR --tasks T1,T2 [--include-path DIR] [--limit N]`: lm-evaluation-harness tasks.

A thin wrapper: it registers the megacpt model (megacpt/evaluation/lm_eval_adapter.py), checks the task names, and calls
lm-eval's `simple_evaluate`. For every other lm-eval option use lm-eval's own command line with the model
registered: `python -m megacpt.evaluation.lm_eval_adapter --model megacpt --model_args checkpoint=DIR ...`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megacpt.cli_helpers import add_overwrite_argument, positive_int
from megacpt.errors import UserError
from megacpt.files import check_output, write_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoints folder (its `latest`) or one tag folder")
    parser.add_argument("--tasks", required=True, metavar="T1,T2",
                        help="comma-separated lm-eval task names (glob patterns allowed)")
    parser.add_argument("--include-path", metavar="DIR", help="a folder of extra task YAML files (e.g. local tasks)")
    parser.add_argument("--only-include-path", action="store_true",
                        help="use only the tasks in --include-path (skips indexing lm-eval's thousands of built-in "
                             "tasks)")
    parser.add_argument("--limit", type=float, metavar="N",
                        help="evaluate only the first N documents of each task (a fraction if < 1)")
    parser.add_argument("--num-fewshot", type=int, metavar="K",
                        help="few-shot examples per prompt (default: the task's)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                        help="requests per forward pass (default 1)")
    parser.add_argument("--output", metavar="FILE",
                        help="write lm-eval's results (and samples with --log-samples) as JSON")
    parser.add_argument("--log-samples", action="store_true",
                        help="keep every document's requests and responses in --output")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table

        import megacpt.evaluation.lm_eval_adapter  # noqa: F401  (registers the "megacpt" model)
    except ImportError as e:
        raise UserError(f"megacpt lm-eval needs lm-evaluation-harness ({e}): pip install 'megacpt[eval]'") from None

    if args.output:
        check_output(args.output, "--output", args.overwrite, [args.checkpoint])  # before the work
    if args.include_path and not Path(args.include_path).is_dir():
        raise UserError(f"--include-path {args.include_path} is not a folder")
    if args.only_include_path and not args.include_path:
        raise UserError("--only-include-path needs --include-path DIR")
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    task_manager = TaskManager(include_path=args.include_path, include_defaults=not args.only_include_path)
    unknown = [name for name in tasks if not task_manager.match_tasks([name])]
    if unknown:
        raise UserError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)}"
                        + ("" if args.include_path else " (local task YAML files need --include-path)"))
    results = lm_eval.simple_evaluate(
        model="megacpt", model_args={"checkpoint": args.checkpoint}, tasks=tasks, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, limit=args.limit, task_manager=task_manager, log_samples=args.log_samples)
    print(make_table(results))
    if args.output:
        keep = ("results", "configs", "versions", "n-shot", "samples")
        kept = {k: results[k] for k in keep if k in results}
        write_output(args.output, json.dumps(kept, indent=1, default=handle_non_serializable), "--output",
                     args.overwrite, [args.checkpoint])
    return 0
