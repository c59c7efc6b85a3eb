"""The forgetting/adaptation table: each run's final loss on every validation set and its change since the
run's stage began (the last evaluation of the stages before it), from the lineage `megacpt.policy.stages` reads.

`megacpt plot --table` prints it and the demo's report builds on it; a library module, so that neither
imports the other's command.
"""
from __future__ import annotations

import math

from megacpt.cli_helpers import text_table
from megacpt.evaluation.lineage import StageRun


def validation_names(histories: dict[str, list[StageRun]]) -> list[str]:
    """Every validation set any run evaluated, in order of first appearance (one panel and one table row each)."""
    names: dict[str, None] = {}
    for stages in histories.values():
        for stage in stages:
            for record in stage.evals:
                names.update(dict.fromkeys(record["eval"]))
    return list(names)


def final_and_change(stages: list[StageRun], name: str, key: str = "eval") -> tuple[float | None, float | None]:
    """The run's last loss on `name` and its change since the stage began (None where unknown); `key`
    "eval_bpb" gives bits per byte instead of loss per token."""
    own = [r[key][name] for r in stages[-1].evals if name in r.get(key, {})]
    before = [r[key][name] for s in stages[:-1] for r in s.evals if name in r.get(key, {})]
    final = own[-1] if own else None
    change = final - before[-1] if final is not None and before else None
    return final, change


def forgetting_table(histories: dict[str, list[StageRun]]) -> str:
    """Rows: validation sets (loss per token, then bits per byte where the data records bytes); columns: runs;
    cells: final value (change since the stage began)."""
    names = validation_names(histories)
    header = ["validation set"] + list(histories)
    rows = []
    for key, suffix in (("eval", ""), ("eval_bpb", " bits/byte")):
        for name in names:
            cells = [name + suffix]
            for stages in histories.values():
                final, change = final_and_change(stages, name, key)
                cells.append("-" if final is None else f"{final:.4f}" + ("" if change is None else f" ({change:+.4f})"))
            if key == "eval" or any(cell != "-" for cell in cells[1:]):
                rows.append(cells)
    tokens = ["tokens"] + [_last_tokens(stages) for stages in histories.values()]
    return text_table([tokens, *rows], headers=header)


def _last_tokens(stages: list[StageRun]) -> str:
    records = stages[-1].train + stages[-1].evals
    tokens = max((r["tokens"] for r in records if "tokens" in r), default=math.nan)
    return f"{tokens:,.0f}"
