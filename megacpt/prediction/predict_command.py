"""`megacpt predict`: fit a loss law on finished runs, then predict the validation curve of planned stages.

    megacpt predict --fit RUN_DIR [RUN_DIR ...] --val NAME [--law tissue|multipower|cpt] [--output FIT.json]
                    [--predict CONFIG [CONFIG ...] --csv FILE [--plot FILE.png]]
    megacpt predict --constants FIT.json --predict CONFIG [CONFIG ...] --csv FILE [--plot FILE.png]

The laws and the fit are megacpt/prediction/losslaw.py, reading runs and configs is
megacpt/prediction/loss_curves.py; this module is the command: arguments, the printed report, the JSON of the
constants, the CSV and the figure. It reads metrics, checkpoint states and configs only and builds no model.
docs/PREDICT.md says how far it holds.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megacpt.cli_helpers import add_overwrite_argument, new_figure, positive_int, require_matplotlib, save_figure
from megacpt.errors import UserError
from megacpt.files import check_output, write_output
from megacpt.prediction import losslaw
from megacpt.prediction.loss_curves import planned_curve, run_curve
from megacpt.run_dir import METRICS

FIXED_WHY = {"kappa": "fixed: the runs have a single replay fraction"}


@dataclass(frozen=True)
class FittedLaw:
    """A fit as --output saves it: the law, the validation set, the constants and where they came from."""

    law: str
    val: str
    constants: dict[str, float]
    fixed: list[str]
    r2: float | None
    mae: float | None
    points: int
    runs: list[str]


@dataclass(frozen=True)
class Prediction:
    """The predicted curve of one planned stage; `steps` count the stage's own steps (1..T)."""

    label: str
    steps: np.ndarray
    lrs: np.ndarray
    losses: np.ndarray


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--fit", nargs="+", metavar="RUN_DIR", help="fit the law on these runs' evaluation losses")
    source.add_argument("--constants", metavar="FIT.json",
                        help="use the constants an earlier --fit saved with --output")
    parser.add_argument("--val", metavar="NAME", help="validation set whose loss to fit (required with --fit)")
    parser.add_argument("--law", choices=sorted(losslaw.LAWS),
                        help="tissue (default), multipower, or cpt (adds the data-shift term)")
    parser.add_argument("--output", metavar="FIT.json", help="save the fitted constants as JSON")
    parser.add_argument("--predict", nargs="+", metavar="CONFIG", help="planned stages (train configs) to predict")
    parser.add_argument("--csv", metavar="FILE",
                        help="write 'config,step,lr,loss' for every step of each planned stage")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="plot the predicted curves above their LR curves (needs matplotlib)")
    parser.add_argument("--starts", type=positive_int, default=8, metavar="N",
                        help="seeded fit starts; the best wins (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit starts (default 0)")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.predict and not args.csv:
        raise UserError("--predict needs --csv FILE for the predicted curves")
    if (args.csv or args.plot) and not args.predict:
        raise UserError("--csv and --plot write predictions: give --predict CONFIG [CONFIG ...]")
    inputs = [*(Path(d) / METRICS for d in args.fit or []), *(args.predict or []), *filter(None, [args.constants])]
    writes = {"overwrite": args.overwrite, "inputs": inputs}
    for option, path in (("--output", args.output), ("--csv", args.csv), ("--plot", args.plot)):
        if path:  # all before any is written
            check_output(path, option, **writes)
    if args.fit:
        if not args.val:
            raise UserError("--fit needs --val NAME, the validation set whose loss to fit")
        fitted = fit_runs([Path(d) for d in args.fit], args.val, args.law or "tissue", args.starts, args.seed)
        print(format_fit(fitted))
        if args.output:
            write_output(args.output, json.dumps(asdict(fitted), indent=2) + "\n", "--output", **writes)
    else:
        if args.output:
            raise UserError("--output saves a new fit; with --constants there is none (the file already holds them)")
        fitted = read_fit(Path(args.constants))
        if args.law and args.law != fitted.law:
            raise UserError(f"--law {args.law} contradicts {args.constants}, which holds {fitted.law} constants")
    if args.plot:
        require_matplotlib("--plot")
    if args.predict:
        predictions = [predict_stage(fitted, Path(c)) for c in args.predict]
        write_csv(Path(args.csv), predictions, **writes)
        if args.plot:
            plot_predictions(Path(args.plot), predictions, f"{fitted.law} law: predicted {fitted.val} loss", **writes)
        for p in predictions:
            print(f"{p.label}: predicted final {fitted.val} loss {p.losses[-1]:.4f} after {len(p.steps)} steps")
        print(f"wrote {args.csv}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def fit_runs(run_dirs: list[Path], val: str, law: str, starts: int = 8, seed: int = 0) -> FittedLaw:
    curves = [run_curve(d, val) for d in run_dirs]
    try:
        fit = losslaw.fit(law, curves, starts, seed)
    except UserError as e:
        raise UserError(f"cannot fit validation set '{val}' of {', '.join(map(str, run_dirs))}: {e}") from None
    return FittedLaw(law, val, fit.constants, list(fit.fixed), fit.r2, fit.mae, fit.points, [str(d) for d in run_dirs])


def format_fit(fitted: FittedLaw) -> str:
    lines = [f"{fitted.law} law on '{fitted.val}', {fitted.points} evaluation points from {len(fitted.runs)} run(s): "
             f"R^2 {fitted.r2:.4f}, MAE {fitted.mae:.4f}"]
    for name, value in fitted.constants.items():
        lines.append(f"  {name:<6} {value:.6g}" + (f"  ({FIXED_WHY[name]})" if name in fitted.fixed else ""))
    return "\n".join(lines)


def read_fit(path: Path) -> FittedLaw:
    """The constants an earlier --output saved, checked against the law they claim."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read --constants {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--constants {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    law = raw.get("law") if isinstance(raw, dict) else None
    if law not in losslaw.LAWS:
        raise UserError(f"--constants {path}: 'law' must be one of {', '.join(sorted(losslaw.LAWS))}, got {law!r}")
    constants = raw.get("constants") if isinstance(raw.get("constants"), dict) else {}
    missing = [n for n in losslaw.LAWS[law].params if not isinstance(constants.get(n), (int, float))]
    if missing or not isinstance(raw.get("val"), str):
        what = f"constants {', '.join(missing)}" if missing else "'val'"
        raise UserError(f"--constants {path} lacks {what}; write it with megacpt predict --fit ... --output")
    number = (int, float, type(None))
    kinds = {"fixed": list, "runs": list, "points": int, "r2": number, "mae": number}
    wrong = [key for key, kind in kinds.items() if key in raw and not isinstance(raw[key], kind)]
    if wrong:
        raise UserError(f"--constants {path}: {wrong[0]} is {json.dumps(raw[wrong[0]])}, not what megacpt predict "
                        "--fit --output writes; write it again that way")
    return FittedLaw(law, raw["val"], {n: float(constants[n]) for n in losslaw.LAWS[law].params},
                     list(raw.get("fixed", [])), raw.get("r2"), raw.get("mae"), int(raw.get("points", 0)),
                     list(raw.get("runs", [])))


def predict_stage(fitted: FittedLaw, config_path: Path) -> Prediction:
    curve = planned_curve(config_path)
    steps = len(curve.steps)
    losses = losslaw.predict(fitted.law, fitted.constants, curve)
    return Prediction(str(config_path), np.arange(1, steps + 1), curve.lrs[-steps:], losses)


def write_csv(path: Path, predictions: list[Prediction], overwrite: bool, inputs: list) -> None:
    lines = ["config,step,lr,loss"]
    for p in predictions:
        rows = zip(p.steps.tolist(), p.lrs.tolist(), p.losses.tolist())
        lines += [f"{p.label},{s},{lr!r},{loss:.6f}" for s, lr, loss in rows]
    write_output(path, "\n".join(lines) + "\n", "--csv", overwrite, inputs)


def plot_predictions(path: Path, predictions: list[Prediction], title: str, overwrite: bool, inputs: list,
                     observed: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Predicted losses above the LR curves, one colour per stage; `observed` (label -> steps, losses) adds
    the measured evaluation losses as dots."""
    figure = new_figure("--plot", figsize=(9, 6.5), layout="constrained")
    loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for i, p in enumerate(predictions):
        colour = f"C{i % 10}"
        loss_ax.plot(p.steps, p.losses, color=colour, label=f"{p.label} (predicted)")
        if observed and p.label in observed:
            loss_ax.plot(*observed[p.label], "o", color=colour, markersize=4, label=f"{p.label} (measured)")
        lr_ax.plot(p.steps, p.lrs, color=colour, label=p.label)
    loss_ax.set(ylabel="validation loss", title=title)
    lr_ax.set(xlabel="step within the stage", ylabel="learning rate")
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    save_figure(figure, path, "--plot", overwrite, inputs)
