"""The `megacpt` command line: one subcommand per job, each living in the module that does the work.

Each entry of COMMANDS names a module that defines `add_arguments(parser)` and `run(args) -> int`. Modules
are imported only when their command runs, so `megacpt schedule` or `megacpt plan` start without torch.
This is the only place that turns a `UserError` into a message and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from megacpt.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megacpt.train.train_command",
        "train one stage from a JSON config (resumes RUN_DIR if it holds a checkpoint)"),
    "preprocess": ("megacpt.data.preprocess_command",
        "tokenize jsonl/txt into Megatron indexed datasets (PREFIX.bin/.idx)"),
    "tokenizer": ("megacpt.data.tokenizer_command",
        "train a SentencePiece tokenizer, or extend one with pieces of a new corpus"),
    "data": ("megacpt.data.data_command",
        "show the samples a training step read, from the run's sample ledger (logging.sample_ledger)"),
    "schedule": ("megacpt.planning.schedule_command",
        "write the LR of every step of a config's stage, or of a chain of stages, as CSV (and a plot)"),
    "plan": ("megacpt.planning.plan_command",
        "parameter count, memory per GPU, step time and the best layout for a cluster"),
    "convert": ("megacpt.weights.convert_command",
        "convert checkpoints between Hugging Face GPT-NeoX and megacpt (verified by comparing logits)"),
    "reshard": ("megacpt.weights.reshard_command",
        "change a checkpoint's tensor-parallel degree (weights and optimizer state)"),
    "extend-vocab": ("megacpt.weights.extend_vocab_command",
        "grow a checkpoint's embedding and output layer for an extended tokenizer (old ids unchanged)"),
    "merge": ("megacpt.weights.merge_command",
        "weighted average of checkpoints of the same architecture (model merging)"),
    "checkpoint": ("megacpt.checkpoint.checkpoint_command",
        "verify checkpoint tags against their manifests; --clean removes unfinished saves"),
    "generate": ("megacpt.weights.generate_command",
        "greedy decoding from a checkpoint, for a quick look"),
    "demo": ("megacpt.demo.demo_command",
        "forgetting and replay end to end on CPU: prose -> code, five stage-1 arms (--quick: ~3 min)"),
    "passkey": ("megacpt.evaluation.passkey_command",
        "synthetic passkey retrieval: a number hidden at chosen depths of a long prompt, scored by loss and greedy "
        "answer"),
    "eval": ("megacpt.evaluation.eval_command",
        "loss and perplexity of a checkpoint on each validation set (the training loop's numbers)"),
    "plot": ("megacpt.evaluation.plot_command",
        "LR and per-dataset validation loss against tokens for runs and their earlier stages (forgetting/adaptation)"),
    "lm-eval": ("megacpt.evaluation.lm_eval_command",
        "run lm-evaluation-harness tasks on a checkpoint (needs the 'eval' extra)"),
    "sweep": ("megacpt.sweep.sweep_command",
        "run a config over a grid of values and seeds, locally or as a SLURM job array, and report the runs side by "
        "side"),
    "predict": ("megacpt.prediction.predict_command",
        "fit a loss law (tissue, multipower, cpt) on runs and predict the validation curves of planned stages"),
}


def _quiet_optional_kernel_warnings() -> None:
    """megatron-core warns on import that optional fused kernels (Apex, Transformer Engine) are missing;
    megacpt does not need them, so the console keeps only what matters."""
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacpt", description="Continual pretraining of GPT-NeoX models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module_name)
        # Arguments are added lazily in main() so that only the chosen command's module is imported.
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher passes `--local_rank=N` before the subcommand; LOCAL_RANK carries the same."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / error and exits 2
        return 2
    _quiet_optional_kernel_warnings()
    module = importlib.import_module(COMMANDS[argv[0]][0])
    command_parser = argparse.ArgumentParser(prog=f"megacpt {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"megacpt {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megacpt {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
