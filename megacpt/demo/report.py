"""The demo's report: DIR/summary.json, DIR/forgetting.png, DIR/lr.png and a table on the console.

The runs' histories (metrics.jsonl, one record per step, an arm's stage 0 included) and the table are the
ones `megacpt plot` reads and prints (`megacpt.stages`, `megacpt.evaluation.forgetting`), so the demo reports
exactly what a user would get from it; this module adds the demo's own figures, on the global step axis
(stage-1 steps follow stage 0's), and the checks of the papers' claims.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megacpt.cli_helpers import new_figure
from megacpt.demo.configs import ARMS, DemoPaths, stage1_run
from megacpt.demo.corpora import CORPORA
from megacpt.evaluation.forgetting import final_and_change, forgetting_table
from megacpt.stages import StageRun, run_lineage

STAGE0_COLOR = "0.5"
ARM_COLORS = {"rewarm": "tab:red", "rewarm_replay": "tab:blue", "constant": "tab:green"}
ARM_LINES = {"rewarm_replay": "--"}  # dashed, so that it shows on top of rewarm's identical LR
CODE_TOLERANCE = 0.10  # rewarm_replay's code loss may be at most 10% above rewarm's


def histories(paths: DemoPaths) -> dict[str, list[StageRun]]:
    """Stage 0's history and each arm's (stage 0 up to the checkpoint the arm started from, then the arm)."""
    runs = {"stage0": paths.run_dir("stage0")} | {arm: paths.run_dir(stage1_run(arm)) for arm in ARMS}
    return {name: run_lineage(run_dir).logged for name, run_dir in runs.items()}


def summarize(history: dict[str, list[StageRun]]) -> dict:
    """{"stage0": {dataset: loss}, "arms": {arm: {"final": ..., "delta": ...}}, "checks": {claim: bool}}.

    "delta" is the change against the stage-0 model, i.e. the last evaluation before the arm's stage began.
    """
    stage0 = {name: final_and_change(history["stage0"], name)[0] for name in CORPORA}
    arms = {}
    for arm in ARMS:
        final_delta = {name: final_and_change(history[arm], name) for name in CORPORA}
        arms[arm] = {"final": {name: fd[0] for name, fd in final_delta.items()},
                     "delta": {name: fd[1] for name, fd in final_delta.items()}}
    return {"stage0": stage0, "arms": arms, "checks": checks(stage0, {arm: arms[arm]["final"] for arm in ARMS})}


def checks(stage0: dict[str, float], final: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The claims the demo exists to show (Ibrahim et al. 2024; Gupta et al. 2023), checked on this run."""
    rewarm, replay, constant = final["rewarm"], final["rewarm_replay"], final["constant"]
    return {
        "every_arm_adapts_to_code": all(f["code"] < stage0["code"] for f in final.values()),
        "replay_forgets_less_prose": replay["prose"] < rewarm["prose"],
        "replay_code_within_10pct_of_rewarm": replay["code"] <= (1 + CODE_TOLERANCE) * rewarm["code"],
        "rewarm_arms_beat_constant_on_code": max(rewarm["code"], replay["code"]) < constant["code"],
    }


def write_report(paths: DemoPaths) -> dict:
    history = histories(paths)
    summary = summarize(history)
    (paths.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    curves = [ReportCurve.of(history["stage0"][-1], "stage 0 (prose)", STAGE0_COLOR, 0)]
    boundary = curves[0].last_step
    curves += [ReportCurve.of(history[arm][-1], arm, ARM_COLORS[arm], boundary, ARM_LINES.get(arm, "-"))
               for arm in ARMS]
    plot_forgetting(curves, paths.root / "forgetting.png")
    plot_lr(curves, paths.root / "lr.png")
    print(forgetting_table(history), flush=True)
    print("\n".join(f"{'yes' if ok else 'NO ':>4}  "
                    f"{claim.replace('_', ' ')}" for claim, ok in summary["checks"].items()),
          flush=True)
    return summary


@dataclass
class ReportCurve:
    """One stage's validation losses and LRs on the global step axis."""

    label: str
    color: str
    line: str
    eval_steps: list[int]
    losses: dict[str, list[float]]
    lr_steps: list[int]
    lrs: list[float]

    @classmethod
    def of(cls, stage: StageRun, label: str, color: str, offset: int, line: str = "-") -> "ReportCurve":
        return cls(label, color, line, [offset + r["step"] for r in stage.evals],
                   {name: [r["eval"][name] for r in stage.evals] for name in CORPORA},
                   [offset + r["step"] for r in stage.train], [r["lr"] for r in stage.train])

    @property
    def last_step(self) -> int:
        return self.eval_steps[-1]

    def after(self, start: "ReportCurve") -> "ReportCurve":
        """This curve preceded by the last evaluation of `start`, so that an arm's line begins where stage 0 ended."""
        return ReportCurve(self.label, self.color, self.line, [start.last_step] + self.eval_steps,
                     {name: start.losses[name][-1:] + values for name, values in self.losses.items()},
                     self.lr_steps, self.lrs)


def _finish(fig, axes, boundary: int, out: Path) -> None:
    """The stage boundary, labels, legend; then save."""
    for ax in axes:
        ax.axvline(boundary, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("step (stage 0 on prose | stage 1 on code)")
        ax.grid(alpha=0.3)
    axes[-1].legend()
    fig.savefig(out, dpi=110)


def plot_forgetting(curves: list[ReportCurve], out: Path) -> None:
    """Prose (forgetting) and code (adaptation) validation loss against the global step, one line per arm."""
    fig = new_figure("megacpt demo", figsize=(11, 4.2), layout="tight")
    axes = fig.subplots(1, 2, sharex=True)
    stage0, arms = curves[0], curves[1:]
    for curve in [stage0] + [arm.after(stage0) for arm in arms]:
        for ax, name in zip(axes, CORPORA):
            ax.plot(curve.eval_steps, curve.losses[name], color=curve.color, linestyle=curve.line, label=curve.label,
                    marker=".")
    for ax, name, role in zip(axes, CORPORA, ("forgetting", "adaptation")):
        ax.set_title(f"{name} validation loss ({role})")
        ax.set_ylabel("loss (nats/token)")
    _finish(fig, axes, stage0.last_step, out)


def plot_lr(curves: list[ReportCurve], out: Path) -> None:
    """The LR each run logged: stage 0, then re-warm + re-decay (with or without replay) or a constant LR."""
    fig = new_figure("megacpt demo", figsize=(8, 3.8), layout="tight")
    ax = fig.subplots()
    for curve in curves:
        ax.plot(curve.lr_steps, curve.lrs, color=curve.color, linestyle=curve.line, label=curve.label, linewidth=2)
    ax.set_ylabel("learning rate")
    ax.set_title("LR of each run")
    _finish(fig, [ax], curves[0].last_step, out)
