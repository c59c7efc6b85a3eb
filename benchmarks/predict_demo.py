"""Loss-law prediction on real runs at demo scale: fit on a cosine stage, predict WSD and infinite-cosine ones.

    python benchmarks/predict_demo.py --workdir /tmp/predict_demo [--plot docs/predict_demo.png]

A tiny GPT-NeoX (the 'tiny' preset, byte tokenizer, seq 128) is pretrained on prose (the base stage, cosine),
then continued on code as three alternative stages from the same base checkpoint, with the same steps, peak
and floor: cosine, WSD and infinite cosine. Each law is fitted on the base run and the cosine stage, then
predicts the WSD and infinite-cosine stages from their configs alone (`megacpt predict`'s own functions);
the script then compares with what those runs measured: MAE over their evaluation points, on the new data
('code', adaptation) and the old ('prose', forgetting). The baseline "the stage ends up where cosine did"
(the cosine stage's measured losses at the same steps) says whether a law adds anything. Runs already in
WORKDIR (a `latest` checkpoint) are reused, so a second call only refits.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from megacpt.cli import main as megacpt
from megacpt.demo.corpora import write_corpora
from megacpt.prediction.loss_curves import run_curve
from megacpt.prediction.predict_command import fit_runs, plot_predictions, predict_stage

LAWS = ("tissue", "multipower", "cpt")
VALS = ("code", "prose")
TARGETS = ("wsd", "infinite_cosine")


def schedules(max_lr: float, min_lr: float, warmup: int) -> dict[str, dict]:
    common = {"max_lr": max_lr, "min_lr": min_lr, "warmup": warmup}
    return {
        "cosine": {"style": "cosine", **common},
        "wsd": {"style": "wsd", "decay_fraction": 0.2, **common},
        # Ibrahim et al.'s phases, eta_const = 0.55 eta_max as in their 405M config
        "infinite_cosine": {"style": "infinite_cosine", "const_lr": 0.55 * max_lr, "cooldown_end": 0.6,
                            "constant_end": 0.85, **common},
    }


def config(work: Path, name: str, source: str, schedule: dict, steps: int, init: str | None) -> Path:
    raw = {
        "run_dir": str(work / "runs" / name),
        "model": {"preset": "tiny", "vocab_size": 257, "seq_length": 128},
        "tokenizer": {"type": "byte"},
        "data": {"sources": [{"name": source, "prefix": str(work / "data" / f"{source}_train")}],
                 "validation": [{"name": v, "prefix": str(work / "data" / f"{v}_val")} for v in VALS],
                 "cache_dir": str(work / "cache")},
        "schedule": schedule,
        "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 8, "log_interval": 1,
                  "eval_interval": max(steps // 15, 1), "eval_samples": 32, "save_interval": 0},
    }
    if init:
        raw["init"] = {"checkpoint": init, "mode": "new_stage"}
    path = Path("configs") / f"{name}.json"  # relative to WORKDIR (the current folder): short labels
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=1))
    return path


def prepare_data(work: Path) -> None:
    if (work / "data" / "code_val.idx").is_file():
        return
    write_corpora(work / "corpora", max_chars=1_000_000)
    for split in ("prose_train", "prose_val", "code_train", "code_val"):
        rc = megacpt(["preprocess", "--input", str(work / "corpora" / f"{split}.jsonl"), "--tokenizer-type", "byte",
                      "--append-eod", "--overwrite", "--output-prefix", str(work / "data" / split)])
        if rc:
            sys.exit(rc)


def train(path: Path) -> float:
    """Seconds `megacpt train` took (0 for a run already finished)."""
    run_dir = Path(json.loads(path.read_text())["run_dir"])
    if (run_dir / "checkpoints" / "latest").is_file():
        return 0.0
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "megacpt", "train", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measured(run_dir: Path, val: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps within the stage, losses) of a run's own evaluation points."""
    curve = run_curve(run_dir, val)
    offset = len(curve.lrs) - int(json.loads((run_dir / "config.json").read_text())["train"]["steps"])
    return curve.steps - offset, curve.losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--base-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=120, help="steps of each continued stage")
    parser.add_argument("--plot", type=Path, help="figure of the cpt law's predictions on 'code'")
    args = parser.parse_args()
    work = args.workdir.resolve()
    plot = args.plot.resolve() if args.plot else None
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    prepare_data(work)

    base = config(work, "base", "prose", schedules(3e-3, 3e-4, 10)["cosine"], args.base_steps, None)
    seconds = {"base": train(base)}
    tag = str(work / "runs" / "base" / "checkpoints")
    stages = {name: config(work, name, "code", s, args.steps, tag) for name, s in schedules(3e-3, 3e-4, 10).items()}
    for name, path in stages.items():
        seconds[name] = train(path)
    print("train seconds:", {k: round(v) for k, v in seconds.items()})

    runs = {name: work / "runs" / name for name in ["base", *stages]}
    results = []
    for law in LAWS:
        for val in VALS:
            fitted = fit_runs([runs["base"], runs["cosine"]], val, law)
            cosine_steps, cosine_losses = measured(runs["cosine"], val)
            row = {"law": law, "val": val, "fit_r2": fitted.r2, "fit_mae": fitted.mae, "constants": fitted.constants}
            for target in TARGETS:
                prediction = predict_stage(fitted, stages[target])
                steps, losses = measured(runs[target], val)
                assert np.array_equal(steps, cosine_steps)
                row[target] = {"mae": float(np.mean(np.abs(prediction.losses[steps - 1] - losses))),
                               "final_error": float(prediction.losses[-1] - losses[-1]),
                               "baseline_mae": float(np.mean(np.abs(cosine_losses - losses))),
                               "baseline_final_error": float(cosine_losses[-1] - losses[-1])}
            results.append(row)
            if plot and law == "cpt" and val == "code":
                predictions = [predict_stage(fitted, stages[name]) for name in stages]
                observed = {str(stages[name]): measured(runs[name], val) for name in stages}
                plot_predictions(plot, predictions, "cpt law fitted on base + cosine stage: 'code' loss of "
                                 "the continued stage (lines) vs measured (dots)", True, [], observed)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print("MAE over the evaluation points (final-loss error, predicted - measured); baseline: the cosine stage's curve")
    print("| law | val | fit R^2 | fit MAE | WSD | infinite cosine | baseline WSD | baseline infinite cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r[t]['mae']:.4f} ({r[t]['final_error']:+.4f})" for t in TARGETS]
        cells += [f"{r[t]['baseline_mae']:.4f} ({r[t]['baseline_final_error']:+.4f})" for t in TARGETS]
        print(f"| {r['law']} | {r['val']} | {r['fit_r2']:.4f} | {r['fit_mae']:.4f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
