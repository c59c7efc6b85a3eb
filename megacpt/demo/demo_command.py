"""`megacpt demo`: forgetting and replay in continual pretraining, end to end on a laptop CPU.

Phases, each driving the same CLI and config files a user would:
corpora (prose and code from this Python) -> tokenizer (`megacpt tokenizer train`) -> datasets
(`megacpt preprocess`) -> stage 0 on prose (`megacpt train`; the infinite arm has its own) -> stage 1 on code
in the arms chosen with --arms -> report.

A phase's outputs are its completion mark: files that appear only when complete (corpora, tokenizer,
datasets), or a run whose latest checkpoint is its last step. A re-run reuses finished phases, and `megacpt
train` resumes an interrupted stage from its RUN_DIR, so an arm added to a work directory later costs only
that arm. The settings are pinned in DIR/demo.json, and every run's config on disk (DIR/configs/, and the
config.json a started run recorded) must be the one this demo trains: a work directory is never silently
reused for a different demo or mixed with edited runs.
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
from megacpt.config import dump_config, load_config, validate_config
from megacpt.demo.configs import ARCHS, ARMS, FULL, QUICK, DemoPaths, DemoSize, stage0_config, stage0_of, stage1_sweep
from megacpt.demo.corpora import CORPORA, SPLITS, write_corpora
from megacpt.errors import UserError
from megacpt.files import check_writable_folder
from megacpt.policy.resume import diff
from megacpt.run_dir import CONFIG
from megacpt.sweep.execute import Job, is_finished, megacpt_command, run_jobs, stop_on_sigterm, train
from megacpt.sweep.grid import write_manifest, write_once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="megacpt-demo", metavar="DIR",
                        help="where corpora, tokenizer, data, configs, runs and the report go (default: "
                             "./megacpt-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller demo (about 3 minutes on 2 cores) for a first look and the tests")
    parser.add_argument("--seed", type=int, default=1234, help="train.seed and data.seed of every run (default: 1234)")
    parser.add_argument("--arch", choices=tuple(ARCHS), default="neox",
                        help="the model: neox (GPT-NeoX, the default) or llama (RMSNorm, SwiGLU, grouped-query "
                             "attention; the same depth, width and parameter count)")
    parser.add_argument("--arms", type=parse_arms, default=ARMS, metavar="ARM,...",
                        help=f"the stage-1 arms to train and report, comma-separated (default: all: {','.join(ARMS)})")


def parse_arms(text: str) -> tuple[str, ...]:
    """--arms A,B: known arms, each once, in the order given."""
    arms = tuple(a.strip() for a in text.split(","))
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not all(arms) or len(set(arms)) != len(arms):
        raise argparse.ArgumentTypeError(f"'{text}': expected distinct arms from {', '.join(ARMS)}")
    return arms


def run(args: argparse.Namespace) -> int:
    require_matplotlib("megacpt demo")  # checked now, not after minutes of training
    stop_on_sigterm()  # stop the children cleanly on SIGTERM too, as on Ctrl-C
    size = QUICK if args.quick else FULL
    check_writable_folder(Path(args.workdir), "--workdir")
    paths = DemoPaths(Path(args.workdir).resolve())
    settings = {"quick": args.quick, "seed": args.seed, "python": sys.version.split()[0], "size": asdict(size),
                "tokenizer": "keep-whitespace", "arch": args.arch}
    pin_settings(paths, settings)
    arms = stage1_sweep(paths, size, args.seed, args.arms, args.arch)
    runs = {name: stage0_config(paths, size, args.seed, name, args.arch)
            for name in dict.fromkeys(map(stage0_of, args.arms))}
    runs.update({run.name: run.config for run in arms.runs})
    check_reuse(paths, runs)  # before anything is written or trained
    start = time.monotonic()
    _timed("corpora", corpora_phase, paths, size)
    _timed("tokenizer", tokenizer_phase, paths, size)
    _timed("datasets", datasets_phase, paths)
    for name in runs:
        write_once(paths.config(name), runs[name])
    write_manifest(arms)
    for name in runs:
        _timed(name, train_phase, paths, name)
    from megacpt.demo.report import write_report

    write_report(paths, arms)
    print(f"[demo] done in {time.monotonic() - start:.0f} s; configs in {paths.root / 'configs'}, "
          f"report in {paths.root / 'summary.json'}, forgetting.png, lr.png", flush=True)
    return 0


def check_reuse(paths: DemoPaths, runs: dict[str, dict]) -> None:
    """Refuse a run whose config file, or the config its run directory was trained with, is not the one this
    demo trains: reusing it would mix another experiment into the report."""
    for name, raw in runs.items():
        wanted = dump_config(validate_config(raw))
        for path in (paths.config(name), paths.run_dir(name) / CONFIG):
            if not path.is_file():
                continue
            try:
                found = dump_config(validate_config(json.loads(path.read_text(encoding="utf-8"))))
            except (UserError, json.JSONDecodeError) as e:
                raise UserError(f"{path} is not a config this demo can reuse ({e}); delete {paths.config(name)} and "
                                f"{paths.run_dir(name)} to train {name} again, or choose another --workdir") from None
            changed = diff(found, wanted)
            if changed:
                key, (old, new) = next(iter(changed.items()))
                raise UserError(f"{path} has {key} = {json.dumps(old, default=_absent)}, but this demo trains {name} "
                                f"with {json.dumps(new, default=_absent)}; delete {paths.config(name)} and "
                                f"{paths.run_dir(name)} to train it again, or choose another --workdir")


def pin_settings(paths: DemoPaths, settings: dict) -> None:
    """Record the demo's settings in DIR/demo.json, or refuse a work directory made with other settings."""
    pinned = paths.root / "demo.json"
    if pinned.is_file():
        previous = {"arch": "neox", **json.loads(pinned.read_text())}  # demo.json before --arch: GPT-NeoX
        if previous != settings:
            changed = ", ".join(k for k in settings if previous.get(k) != settings[k])
            raise UserError(f"--workdir {paths.root} holds a demo made with other settings ({changed} differ, see "
                            f"{pinned}); choose another --workdir or delete this one")
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    pinned.write_text(json.dumps(settings, indent=1) + "\n")


def _absent(value: object) -> str:
    return "(none)"  # resume.diff's mark for a key one side lacks


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


def train_phase(paths: DemoPaths, run: str) -> bool:
    """`megacpt train` on the run's config file; resumes if interrupted."""
    config_path = paths.config(run)
    config = load_config(config_path)
    if is_finished(config):
        return False
    print(f"[{run}] megacpt train {config_path}", flush=True)
    train(run, config, config_path, paths.logs / f"{run}.log", step_every=config.train.eval_interval)
    return True
