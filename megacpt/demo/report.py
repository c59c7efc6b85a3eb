"""The demo's report: the sweep report of its three arms (DIR/summary.json, summary.txt, sweep.png and the
table on the console), plus the demo's own figures (forgetting.png, lr.png) and the checks of the papers' claims.

The runs' histories (metrics.jsonl, one record per step, an arm's stage 0 included) and each arm's final loss
and change since stage 0 come from the sweep report, which reads them as `megacpt plot` does; this module adds
stage 0's numbers, the figures on the global step axis (stage-1 steps follow stage 0's) and the checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megacpt.cli_helpers import new_figure
from megacpt.demo.configs import DemoPaths
from megacpt.demo.corpora import CORPORA
from megacpt.evaluation.forgetting import final_and_change
from megacpt.stages import StageRun, run_lineage
from megacpt.sweep import report
from megacpt.sweep.grid import Sweep

STAGE0_COLOR = "0.5"
ARM_COLORS = {"rewarm": "tab:red", "rewarm_replay": "tab:blue", "constant": "tab:green"}
ARM_LINES = {"rewarm_replay": "--"}  # dashed, so that it shows on top of rewarm's identical LR
CODE_TOLERANCE = 0.10  # rewarm_replay's code loss may be at most 10% above rewarm's


def summarize(stage0: list[StageRun], arms: list[report.RunResult]) -> dict:
    """{"stage0": {dataset: loss}, "arms": {arm: {"final": ..., "delta": ...}}, "checks": {claim: bool}}.

    "delta" is the sweep report's change: against the stage-0 model, the last evaluation before the arm began.
    """
    stage0_final = {name: final_and_change(stage0, name)[0] for name in CORPORA}
    by_arm = {r.labels["arm"]: {"final": {name: r.validation[name][0] for name in CORPORA},
                                "delta": {name: r.validation[name][1] for name in CORPORA}} for r in arms}
    return {"stage0": stage0_final, "arms": by_arm,
            "checks": checks(stage0_final, {arm: result["final"] for arm, result in by_arm.items()})}


def checks(stage0: dict[str, float], final: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The claims the demo exists to show (Ibrahim et al. 2024; Gupta et al. 2023), checked on this run."""
    rewarm, replay, constant = final["rewarm"], final["rewarm_replay"], final["constant"]
    return {
        "every_arm_adapts_to_code": all(f["code"] < stage0["code"] for f in final.values()),
        "replay_forgets_less_prose": replay["prose"] < rewarm["prose"],
        "replay_code_within_10pct_of_rewarm": replay["code"] <= (1 + CODE_TOLERANCE) * rewarm["code"],
        "rewarm_arms_beat_constant_on_code": max(rewarm["code"], replay["code"]) < constant["code"],
    }


def write_report(paths: DemoPaths, arms: Sweep) -> dict:
    stage0 = run_lineage(paths.run_dir("stage0")).logged
    results = report.collect(arms)
    ended = "  ".join(f"{name} {final_and_change(stage0, name)[0]:.4f}" for name in CORPORA)
    print(f"stage 0 (prose) ended at {ended}", flush=True)
    summary = report.write_report(arms, results, extra=summarize(stage0, results))
    curves = [ReportCurve.of(stage0[-1], "stage 0 (prose)", STAGE0_COLOR, 0)]
    boundary = curves[0].last_step
    curves += [ReportCurve.of(r.history[-1], r.labels["arm"], ARM_COLORS[r.labels["arm"]], boundary,
                        ARM_LINES.get(r.labels["arm"], "-")) for r in results]
    plot_forgetting(curves, paths.root / "forgetting.png")
    plot_lr(curves, paths.root / "lr.png")
    print("\n".join(f"{'yes' if ok else 'NO ':>4}  {claim.replace('_', ' ')}"
                    for claim, ok in summary["checks"].items()), flush=True)
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
