"""`megacpt data show RUN_DIR --step S`: the samples one optimizer step of a run trained on, as text.

It reads the step's line of RUN_DIR/samples.jsonl (the sample ledger) and looks every id up in its source's
stream, rebuilt from RUN_DIR/config.json and the stage history the run started from (its own latest
checkpoint, else its init.checkpoint) exactly as training built it; the tokenizer of the config turns the
tokens into text, and without one (or with --ids) the token ids are printed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megacpt.cli_helpers import positive_int
from megacpt.config import RunConfig, load_config
from megacpt.errors import UserError
from megacpt.run_dir import SAMPLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the samples of one step of a run that kept a sample ledger",
                              description="print the samples of one step of a run that kept a sample ledger")
    show.add_argument("run_dir", metavar="RUN_DIR")
    show.add_argument("--step", type=positive_int, required=True, metavar="S", help="the optimizer step (1 = first)")
    show.add_argument("--source", metavar="NAME", help="only this source's samples")
    show.add_argument("--ids", action="store_true", help="print token ids even where a tokenizer is configured")


def earlier_stages(config: RunConfig) -> list:
    """The stage history the run's stage started after: from its own latest checkpoint, else from init."""
    from megacpt.checkpoint.tags import list_tags, resolve_tag
    from megacpt.policy.stages import read_state
    from megacpt.run_dir import checkpoint_dir

    own = checkpoint_dir(config.run_dir)
    if list_tags(own):
        return read_state(resolve_tag(own, key="run_dir")).stages[:-1]
    if config.init.checkpoint:
        return read_state(resolve_tag(config.init.checkpoint)).stages
    return []


def run(args: argparse.Namespace) -> int:
    from megacpt.data.datasets import build_train_dataset
    from megacpt.data.ledger import read_step
    from megacpt.data.tokenizers import build_tokenizer, eod_id

    run_dir = Path(args.run_dir)
    samples = read_step(run_dir, args.step)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} holds no config.json: not a megacpt run directory")
    config = load_config(run_dir / "config.json")
    config.run_dir = str(run_dir)  # the folder may have moved since
    if args.source is not None and args.source not in samples:
        raise UserError(f"--source {args.source}: step {args.step} has no samples of it; its sources: "
                        f"{', '.join(samples)}")
    batch = config.train.global_batch_size
    dataset = build_train_dataset(config.data, batch, batch, config.model.seq_length, str(config.data_cache_dir),
                                  config.model.vocab_size, eod_id(config.tokenizer), earlier_stages(config),
                                  stage_steps=config.train.steps)
    tokenizer = build_tokenizer(config.tokenizer) if config.tokenizer is not None and not args.ids else None
    for name, ids in samples.items():
        if args.source is not None and name != args.source:
            continue
        if name not in dataset.names:
            raise UserError(f"{run_dir / SAMPLES}: source '{name}' of step {args.step} is not in "
                            f"{run_dir / 'config.json'}; was the ledger written by another config?")
        source = dataset.sources[dataset.names.index(name)]
        for sample_id in ids:
            sample = source.sample(sample_id)
            tokens = sample["tokens"].tolist() + sample["labels"].tolist()[-1:]
            print(f"=== step {args.step}, {name}, sample {sample_id} ({len(tokens)} tokens)")
            print(tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens)))
    return 0
