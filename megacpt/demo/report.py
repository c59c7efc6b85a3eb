"""The demo's report: the sweep report of its arms (DIR/summary.json, summary.txt, sweep.png and the table on
the console), plus the demo's own figures (forgetting.png, lr.png), the area under each arm's prose curve and
the checks of the papers' claims.

The runs' histories (metrics.jsonl, one record per step, an arm's stage 0 included) and each arm's final loss
and change since its stage 0 come from the sweep report, which reads them as `megacpt plot` does; this module
adds the stage-0 numbers, the areas, the figures on the global step axis (stage-1 steps follow stage 0's) and
the checks. The checks are the claims the demo was built to show; the infinite arm is reported, not checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megacpt.cli_helpers import new_figure
from megacpt.demo.configs import STAGE0, DemoPaths, stage0_of
from megacpt.demo.corpora import CORPORA
from megacpt.evaluation.forgetting import final_and_change
from megacpt.evaluation.lineage import StageRun, run_lineage
from megacpt.sweep import report
from megacpt.sweep.grid import Sweep

STAGE0_STYLE = {STAGE0: ("stage 0 (prose)", "0.5", "-"), "stage0_infinite": ("stage 0 infinite (prose)", "0.5", ":")}
ARM_COLORS = {"rewarm": "tab:red", "rewarm_replay": "tab:blue", "constant": "tab:green", "infinite": "tab:purple",
              "replay_schedule": "tab:orange"}
ARM_LINES = {"rewarm_replay": "--", "replay_schedule": ":"}  # so that they show on top of rewarm's identical LR
CODE_TOLERANCE = 0.10  # rewarm_replay's code loss may be at most 10% above rewarm's


def summarize(stage0: dict[str, list[StageRun]], arms: list[report.RunResult]) -> dict:
    """{STAGE0 run: {dataset: loss}, "arms": {arm: {"final", "delta", "prose_area", "prose_area_above_stage0"}},
    "checks": {claim: bool}}.

    "delta" is the sweep report's change: against the arm's stage-0 model, the last evaluation before it began.
    """
    stage0_final = {run: {name: final_and_change(history, name)[0] for name in CORPORA}
                    for run, history in stage0.items()}
    by_arm = {}
    for r in arms:
        arm = r.labels["arm"]
        start = stage0_final[stage0_of(arm)]["prose"]
        area = prose_area(start, r.history[-1])
        by_arm[arm] = {"final": {name: r.validation[name][0] for name in CORPORA},
                       "delta": {name: r.validation[name][1] for name in CORPORA},
                       "prose_area": area, "prose_area_above_stage0": area - start * r.history[-1].evals[-1]["step"]}
    return {**stage0_final, "arms": by_arm, "checks": checks(stage0_final, by_arm)}


def prose_area(start: float, stage: StageRun) -> float:
    """The area under the prose validation loss over the stage's steps (trapezoid rule), from step 0 (the
    stage-0 model's loss, `start`) to the stage's last evaluation: how much prose was forgotten, for how long."""
    steps = [0] + [r["step"] for r in stage.evals]
    losses = [start] + [r["eval"]["prose"] for r in stage.evals]
    return sum((b - a) * (x + y) / 2 for a, b, x, y in zip(steps, steps[1:], losses, losses[1:]))


def checks(stage0: dict[str, dict[str, float]], arms: dict[str, dict]) -> dict[str, bool]:
    """The claims the demo exists to show (Ibrahim et al. 2024; Gupta et al. 2023), checked on this run, each
    where its arms were trained."""
    final = {arm: result["final"] for arm, result in arms.items()}
    out = {"every_arm_adapts_to_code": all(f["code"] < stage0[stage0_of(arm)]["code"] for arm, f in final.items())}
    if {"rewarm", "rewarm_replay"} <= final.keys():
        rewarm, replay = final["rewarm"], final["rewarm_replay"]
        out["replay_forgets_less_prose"] = replay["prose"] < rewarm["prose"]
        out["replay_code_within_10pct_of_rewarm"] = replay["code"] <= (1 + CODE_TOLERANCE) * rewarm["code"]
        if "constant" in final:
            out["rewarm_arms_beat_constant_on_code"] = max(rewarm["code"], replay["code"]) < final["constant"]["code"]
    return out


def write_report(paths: DemoPaths, arms: Sweep) -> dict:
    results = report.collect(arms)
    stage0 = {run: run_lineage(paths.run_dir(run)).logged
              for run in dict.fromkeys(stage0_of(r.labels["arm"]) for r in results)}
    for run, history in stage0.items():
        ended = "  ".join(f"{name} {final_and_change(history, name)[0]:.4f}" for name in CORPORA)
        print(f"{run} (prose) ended at {ended}", flush=True)
    summary = report.write_report(arms, results, extra=summarize(stage0, results))
    starts = {}
    for run, history in stage0.items():
        label, color, line = STAGE0_STYLE[run]
        starts[run] = ReportCurve.of(history[-1], label, color, 0, line)
    boundary = max(curve.last_step for curve in starts.values())
    curves = list(starts.values())
    for r in results:
        arm = r.labels["arm"]
        curves.append(ReportCurve.of(r.history[-1], arm, ARM_COLORS[arm], boundary, ARM_LINES.get(arm, "-"))
                      .after(starts[stage0_of(arm)]))
    plot_forgetting(curves, boundary, paths.root / "forgetting.png")
    plot_lr(curves, boundary, paths.root / "lr.png")
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


def plot_forgetting(curves: list[ReportCurve], boundary: int, out: Path) -> None:
    """Prose (forgetting) and code (adaptation) validation loss against the global step, one line per run."""
    fig = new_figure("megacpt demo", figsize=(11, 4.2), layout="tight")
    axes = fig.subplots(1, 2, sharex=True)
    for curve in curves:
        for ax, name in zip(axes, CORPORA):
            ax.plot(curve.eval_steps, curve.losses[name], color=curve.color, linestyle=curve.line, label=curve.label,
                    marker=".")
    for ax, name, role in zip(axes, CORPORA, ("forgetting", "adaptation")):
        ax.set_title(f"{name} validation loss ({role})")
        ax.set_ylabel("loss (nats/token)")
    _finish(fig, axes, boundary, out)


def plot_lr(curves: list[ReportCurve], boundary: int, out: Path) -> None:
    """The LR each run logged: stage 0 (cosine or infinite), then re-warm + re-decay (with or without replay), a
    constant LR, or the infinite schedule continued at its constant LR and annealed."""
    fig = new_figure("megacpt demo", figsize=(8, 3.8), layout="tight")
    ax = fig.subplots()
    for curve in curves:
        ax.plot(curve.lr_steps, curve.lrs, color=curve.color, linestyle=curve.line, label=curve.label, linewidth=2)
    ax.set_ylabel("learning rate")
    ax.set_title("LR of each run")
    _finish(fig, [ax], boundary, out)
