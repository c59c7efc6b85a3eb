"""`megacpt demo`: forgetting and replay in continual pretraining, end to end on a laptop CPU.

Phases, each driving the same CLI and config files a user would:
corpora (prose and code from this Python) -> tokenizer (`megacpt tokenizer train`) -> datasets
(`megacpt preprocess`) -> stage 0 on prose (`megacpt train`) -> stage 1 on code in three arms -> report.

A phase's outputs are its completion mark: files that appear only when complete (corpora, tokenizer,
datasets), or a run whose latest checkpoint is its last step. A re-run reuses finished phases, and `megacpt
train` resumes an interrupted stage from its RUN_DIR. The settings are pinned in DIR/demo.json, so a work
directory is never silently reused for a different demo.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from megacpt.cli_helpers import require_matplotlib
from megacpt.config import load_config
from megacpt.demo.configs import FULL, QUICK, DemoPaths, DemoSize, stage0_config, stage1_sweep
from megacpt.demo.corpora import CORPORA, SPLITS, write_corpora
from megacpt.errors import UserError
from megacpt.sweep.execute import Job, is_finished, megacpt_command, run_jobs, stop_on_sigterm, train
from megacpt.sweep.grid import write_once, write_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="megacpt-demo", metavar="DIR",
                        help="where corpora, tokenizer, data, configs, runs and the report go (default: "
                             "./megacpt-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller demo (about 2 minutes on 2 cores) for a first look and the tests")
    parser.add_argument("--seed", type=int, default=1234, help="train.seed and data.seed of every run (default: 1234)")


def run(args: argparse.Namespace) -> int:
    require_matplotlib("megacpt demo")  # checked now, not after minutes of training
    stop_on_sigterm()  # stop the children cleanly on SIGTERM too, as on Ctrl-C
    size = QUICK if args.quick else FULL
    paths = DemoPaths(Path(args.workdir).resolve())
    settings = {"quick": args.quick, "seed": args.seed, "python": sys.version.split()[0], "size": asdict(size),
                "tokenizer": "keep-whitespace"}
    pin_settings(paths, settings)
    start = time.monotonic()
    _timed("corpora", corpora_phase, paths, size)
    _timed("tokenizer", tokenizer_phase, paths, size)
    _timed("datasets", datasets_phase, paths)
    _timed("stage0", train_phase, paths, "stage0", stage0_config(paths, size, args.seed))
    arms = stage1_sweep(paths, size, args.seed)
    write_sweep(arms)
    for run in arms.runs:
        _timed(run.name, train_phase, paths, run.name, run.config)
    from megacpt.demo.report import write_report

    write_report(paths, arms)
    print(f"[demo] done in {time.monotonic() - start:.0f} s; configs in {paths.root / 'configs'}, "
          f"report in {paths.root / 'summary.json'}, forgetting.png, lr.png", flush=True)
    return 0


def pin_settings(paths: DemoPaths, settings: dict) -> None:
    """Record the demo's settings in DIR/demo.json, or refuse a work directory made with other settings."""
    pinned = paths.root / "demo.json"
    if pinned.is_file():
        previous = json.loads(pinned.read_text())
        if previous != settings:
            changed = ", ".join(k for k in settings if previous.get(k) != settings[k])
            raise UserError(f"--workdir {paths.root} holds a demo made with other settings ({changed} differ, see "
                            f"{pinned}); choose another --workdir or delete this one")
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    pinned.write_text(json.dumps(settings, indent=1) + "\n")


def _timed(name: str, phase: Callable[..., bool], *args) -> None:
    """Run a phase (which returns False when its outputs already exist) and say how long it took."""
    start = time.monotonic()
    if phase(*args):
        print(f"[{name}] done in {time.monotonic() - start:.0f} s", flush=True)
    else:
        print(f"[{name}] reused (finished in an earlier run)", flush=True)


def corpora_phase(paths: DemoPaths, size: DemoSize) -> bool:
    """Prose and code documents from this Python's standard library, split into train and validation."""
    if all(paths.corpus(name, split).is_file() for name in CORPORA for split in SPLITS):
        return False
    print(f"[corpora] reading the standard library of Python {sys.version.split()[0]} ...", flush=True)
    for stats in write_corpora(paths.corpora, size.corpus_chars):
        print(f"[corpora] {stats.name}: {stats.train:,} train and {stats.validation:,} validation documents, "
              f"{stats.chars:,} characters", flush=True)
    return True


def tokenizer_phase(paths: DemoPaths, size: DemoSize) -> bool:
    """A SentencePiece model trained on both training corpora, keeping code's newlines and indentation."""
    if Path(f"{paths.tokenizer_prefix}.model").is_file():
        return False
    run_jobs([Job("tokenizer", megacpt_command("tokenizer", "train", "--input",
                                               *(str(paths.corpus(n, "train")) for n in CORPORA),
                                               "--vocab-size", str(size.vocab_size), "--keep-whitespace",
                                               "--output", str(paths.tokenizer_prefix)),
                  paths.logs / "tokenizer.log")])
    return True


def datasets_phase(paths: DemoPaths) -> bool:
    """Every corpus split as a Megatron indexed dataset, the four preprocessing runs side by side."""
    todo = [(name, split) for name in CORPORA for split in SPLITS
            if not Path(f"{paths.dataset(name, split)}.idx").is_file()]
    if not todo:
        return False
    run_jobs([Job(f"preprocess {name}_{split}",
                  megacpt_command("preprocess", "--input", str(paths.corpus(name, split)), "--tokenizer-type",
                                  "sentencepiece", "--tokenizer-model", f"{paths.tokenizer_prefix}.model",
                                  "--append-eod", "--output-prefix", str(paths.dataset(name, split))),
                  paths.logs / f"preprocess_{name}_{split}.log")
              for name, split in todo])
    return True


def train_phase(paths: DemoPaths, run: str, config: dict) -> bool:
    """`megacpt train` on the run's config file, written once so that a user's edits stick; resumes if interrupted."""
    config_path = write_once(paths.config(run), config)
    config = load_config(config_path)
    if is_finished(config):
        return False
    print(f"[{run}] megacpt train {config_path}", flush=True)
    train(run, config, config_path, paths.logs / f"{run}.log", step_every=config.train.eval_interval)
    return True
