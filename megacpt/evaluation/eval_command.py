"""`megacpt eval CONFIG --checkpoint DIR`: loss, perplexity and bits per byte of a checkpoint on each validation set.

The numbers are the training loop's own: the same validation samples (train.eval_samples, or --samples,
whatever the world size), the same `validation_losses`, and the engine built and loaded by the loop's own
code (`engine.build_engine`, then `checkpoint.locate.plan_init` and `load_into_engine` as for a new stage on these
weights), so parameter groups and precision (bf16 on GPU) cannot differ from training. Evaluating the
checkpoint of step s gives exactly the `eval` record of step s in metrics.jsonl. One process or under the
deepspeed launcher (tensor parallel as the config says, the rest data parallel). It trains nothing and writes
no metrics; only the validation datasets' index cache is written (to the config's data cache, as training
does).
"""
from __future__ import annotations

import argparse
import json
import math

from megacpt.checkpoint.locate import plan_init
from megacpt.cli_helpers import add_overwrite_argument, add_set_argument, non_negative_int, positive_int, text_table
from megacpt.config import InitConfig, RunConfig, ValidationSet, load_config
from megacpt.errors import UserError
from megacpt.files import check_output, write_output
from megacpt.policy.load_plan import LoadPlan, check_architecture


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="JSON run config (model, parallel, data.validation, train.micro_batch_size)")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoints folder (its `latest`) or one tag folder")
    parser.add_argument("--samples", type=positive_int, metavar="N",
                        help="sequences per validation set, whatever the world size (default: train.eval_samples)")
    parser.add_argument("--position-bucket", type=non_negative_int, metavar="N",
                        help="also the loss per bucket of N positions (default: train.eval_position_bucket; 0 none)")
    parser.add_argument("--data", nargs="+", metavar="NAME[=PREFIX]",
                        help="validation sets to evaluate instead of all of data.validation: NAME picks one of the "
                             "config's, NAME=PREFIX adds an indexed dataset")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON (refused if FILE exists)")
    add_overwrite_argument(parser)
    add_set_argument(parser)


def run(args: argparse.Namespace) -> int:
    inputs = [args.config, args.checkpoint]
    if args.json:
        check_output(args.json, "--json", args.overwrite, inputs)  # before the work
    config = load_config(args.config, args.overrides)
    config.data.allow_validation_overlap = True  # --data NAME=PREFIX may name training data on purpose
    config.data.validation = select_validation(config.data.validation, args.data)
    if args.samples:
        config.train.eval_samples = args.samples
    if args.position_bucket is not None:
        config.train.eval_position_bucket = args.position_bucket
    config.init = InitConfig(checkpoint=args.checkpoint)  # the weights only, as a new stage loads them
    plan = plan_init(config, key="--checkpoint")
    check_architecture(config, plan.state, plan.tag_dir)
    check_validation_data(config, args.samples is not None)
    results = evaluate_checkpoint(config, plan)
    if results is not None:
        state = plan.state
        report = {"checkpoint": str(plan.tag_dir), "step": state.step, "tokens": state.tokens,
                  "samples": config.train.eval_samples, "results": results}
        print(format_report(report))
        if args.json:
            write_output(args.json, json.dumps(report, indent=1) + "\n", "--json", args.overwrite, inputs)
    return 0


def select_validation(configured: list[ValidationSet], requested: list[str] | None) -> list[ValidationSet]:
    """The validation sets to evaluate: all of the config's, or the ones `--data` names or adds."""
    if requested is None:
        if not configured:
            raise UserError("the config has no data.validation sets; add some or give --data NAME=PREFIX")
        return configured
    known = {v.name: v for v in configured}
    chosen: dict[str, ValidationSet] = {}
    for item in requested:
        name, sep, prefix = item.partition("=")
        if not name or (sep and not prefix):
            raise UserError(f"--data expects NAME or NAME=PREFIX, got '{item}'")
        if not sep and name not in known:
            listed = ", ".join(known) or "none"
            raise UserError(f"--data: unknown validation set '{name}'; the config's are: {listed} "
                            f"(give NAME=PREFIX to evaluate another dataset)")
        if name in chosen:
            raise UserError(f"--data names validation set '{name}' twice")
        chosen[name] = ValidationSet(name=name, prefix=prefix) if sep else known[name]
    return list(chosen.values())


def check_validation_data(config: RunConfig, samples_given: bool) -> None:
    """Every validation dataset exists and fits the vocabulary, before the world starts."""
    from megacpt.data.datasets import check_indexed_dataset, check_validation_size

    for val in config.data.validation:
        check_indexed_dataset(val.prefix, f"validation set '{val.name}'", config.model.vocab_size,
                              config.model.seq_length)
    if samples_given:  # a number asked for on purpose; the config's default may cover a small set more than once
        check_validation_size(config.data, config.train.eval_samples, config.model.seq_length, "--samples")


def evaluate_checkpoint(config: RunConfig, plan: LoadPlan) -> dict[str, dict] | None:
    """{name: {loss, perplexity}} on the main rank (None elsewhere): the loop's evaluation of these weights."""
    from megatron.core import parallel_state

    from megacpt.checkpoint.load import load_into_engine
    from megacpt.data.datasets import build_validation_datasets
    from megacpt.data.tokenizers import eod_id
    from megacpt.runtime.distributed import setup_world
    from megacpt.runtime.engine import build_engine
    from megacpt.train.validation import bits_per_byte, validation_losses

    world = setup_world(config.parallel.tensor, config.train.seed)
    engine, _, _ = build_engine(config, world)
    load_into_engine(engine, plan, world)
    train = config.train
    datasets = build_validation_datasets(config.data, train.eval_samples,
                                         config.model.seq_length, str(config.data_cache_dir), config.model.vocab_size,
                                         eod_id(config.tokenizer))
    losses, tokens, by_position = validation_losses(
        engine, datasets, train.eval_samples, train.micro_batch_size, world.data_rank, world.data_size, world.device,
        parallel_state.get_data_parallel_group(), train.eval_position_bucket)
    if not world.is_main:
        return None
    bpb = bits_per_byte(losses, datasets, train.eval_samples)
    return {name: {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens[name],
                   **({"bpb": bpb[name]} if name in bpb else {}),
                   **({"by_position": by_position[name]} if name in by_position else {})}
            for name, loss in losses.items()}


def format_report(report: dict) -> str:
    rows = [(name, f"{r['loss']:.4f}", f"{r['perplexity']:.3f}", f"{r['tokens']:,}",
             f"{r['bpb']:.4f}" if "bpb" in r else "-") for name, r in report["results"].items()]
    title = (f"checkpoint {report['checkpoint']} (step {report['step']}, {report['tokens']} tokens), "
             f"{report['samples']} sequences per validation set")
    table = text_table(rows, ["validation set", "loss", "perplexity", "tokens", "bits/byte"],
                       align=("left", "right", "right", "right", "right"))
    buckets = {name: r["by_position"] for name, r in report["results"].items() if "by_position" in r}
    if buckets:
        columns = list(next(iter(buckets.values())))
        table += "\nloss by position\n" + text_table(
            [[name, *(f"{b[c]:.4f}" for c in columns)] for name, b in buckets.items()], ["validation set", *columns])
    return title + "\n" + table

