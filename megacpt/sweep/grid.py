"""A sweep on disk: a base config and its axes expanded into one validated config per run.

`expand` applies each run's values with `megacpt train --set`'s own code (`config.apply_override`, then
`validate_config` and the schedule check), so a bad key or value fails before anything is written or run,
with the key named. `write_sweep` puts the manifest in DIR/sweep.json and each run's config in
DIR/configs/NAME.json; run directories are DIR/runs/NAME. Nothing already on disk is overwritten: a work
directory that holds another sweep is refused, and a config file that exists is kept (so edits stick).
This module neither trains nor reports.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megacpt.config import apply_override, validate_config
from megacpt.errors import ConfigError, UserError
from megacpt.files import write_atomic

MANIFEST = "sweep.json"
SEED = "seed"  # the axis --seeds adds; it sets train.seed and data.seed together
MAX_LABEL = 40  # longer values are named by their position in the axis instead


@dataclass(frozen=True)
class Axis:
    """One swept dimension: its name (the dotted key, KEY1:KEY2 for keys that change together, "seed", or a
    caller's label such as the demo's "arm"), its values as written, and the `--set` items each value applies
    (none where the caller writes the configs itself)."""

    key: str
    labels: tuple[str, ...]  # each value as the user wrote it: in run names, tables and figures
    settings: tuple[tuple[str, ...], ...] = ()  # per label: "dotted.key=value" items

    @property
    def targets(self) -> list[str]:
        return [item.partition("=")[0] for item in self.settings[0]] if self.settings else []


@dataclass(frozen=True)
class SweepRun:
    """One run: its name (configs/NAME.json, runs/NAME), its value on every axis and its raw config."""

    name: str
    labels: dict[str, str]
    values: dict[str, Any]  # the value on each axis as the validated config holds it
    config: dict


@dataclass(frozen=True)
class Sweep:
    root: Path
    axes: tuple[Axis, ...]
    runs: tuple[SweepRun, ...]

    def config_path(self, name: str) -> Path:
        return self.root / "configs" / f"{name}.json"

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def manifest(self) -> dict:
        return {"axes": [{"key": a.key, "labels": list(a.labels)} for a in self.axes],
                "runs": [{"name": r.name, "labels": r.labels, "values": r.values, "config": r.config}
                         for r in self.runs]}


# ------------------------------------------------------------------------------------ the grid


def parse_grid(item: str) -> Axis:
    """`KEY=V1,V2,...` (each value as `--set` reads it), `KEY=[V1, V2, ...]` (a JSON list, for values with
    commas), and for keys that change together `KEY1:KEY2=A1:B1,A2:B2` or `KEY1:KEY2=[[A1, B1], [A2, B2]]`."""
    keys, sep, text = item.partition("=")
    targets = keys.split(":")
    if not sep or not all(targets) or not text:
        raise UserError(f"--grid expects KEY=V1,V2,... (or KEY=[JSON values], or KEY1:KEY2=A1:B1,A2:B2), got '{item}'")
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--grid {keys}: '{text}' is not a JSON list: {e.msg}") from None
        rows = [[json.dumps(c) for c in v] if len(targets) > 1 and isinstance(v, list) else [json.dumps(v)]
                for v in values]
    else:
        rows = [value.split(":") if len(targets) > 1 else [value] for value in text.split(",")]
    if not rows or any(not c.strip() for row in rows for c in row):
        raise UserError(f"--grid {keys}: empty value in '{text}'")
    if any(len(row) != len(targets) for row in rows):
        raise UserError(f"--grid {keys}: every value needs {len(targets)} parts, one per key, in '{text}'")
    labels = tuple(":".join(row) for row in rows)
    if len(set(labels)) != len(labels):
        raise UserError(f"--grid {keys}: a value is repeated in '{text}'")
    return Axis(keys, labels, tuple(tuple(f"{t}={c}" for t, c in zip(targets, row)) for row in rows))


def grid_axes(grids: list[str], seeds: list[int]) -> list[Axis]:
    """The axes of `--grid` flags in order, then the seed axis when there are seeds."""
    axes = [parse_grid(item) for item in grids]
    targets = [t for a in axes for t in a.targets]
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise UserError(f"--grid names {', '.join(repeated)} more than once; give all its values in one --grid")
    if "run_dir" in targets:
        raise UserError("--grid run_dir: each run's run_dir is DIR/runs/NAME, set by the sweep")
    if seeds:
        clash = [t for t in targets if t in ("train.seed", "data.seed")]
        if clash:
            raise UserError(f"--seeds sets train.seed and data.seed; do not also --grid {clash[0]}")
        axes.append(Axis(SEED, tuple(map(str, seeds)), tuple((f"train.seed={s}", f"data.seed={s}") for s in seeds)))
    return axes


def expand(base: dict, axes: list[Axis], root: Path, source: str) -> Sweep:
    """Every combination of the axes' values (the first axis outermost, seeds outermost of all so that a
    partly finished sweep covers the whole grid with its first seeds), validated, named after its values."""
    root = root.resolve()
    order = sorted(axes, key=lambda a: a.key != SEED)
    namer = _namer(axes)
    runs = []
    for combo in itertools.product(*(range(len(a.labels)) for a in order)):
        picked = {a.key: i for a, i in zip(order, combo)}
        labels = {a.key: a.labels[picked[a.key]] for a in axes}
        name = namer(labels)
        raw = copy.deepcopy(base)
        for axis in axes:
            for item in axis.settings[picked[axis.key]]:
                apply_override(raw, item)
        raw["run_dir"] = str(root / "runs" / name)
        where = f"{source} with " + " ".join(f"{k}={v}" for k, v in labels.items()) if labels else source
        dumped = check_run_config(raw, where).model_dump(mode="json")
        values = {a.key: _value(dumped, a) for a in axes}
        runs.append(SweepRun(name, labels, values, raw))
    return Sweep(root, tuple(axes), tuple(runs))


def _value(config: dict, axis: Axis) -> Any:
    """The axis's value as the validated config holds it: one key's value, a list for linked keys (seed: train.seed)."""
    values = [_lookup(config, t) for t in axis.targets]
    return values[0] if len(values) == 1 or axis.key == SEED else values


def check_run_config(raw: dict, source: str):
    """What `megacpt train` checks before it starts, short of the data files: the schema and the schedule."""
    from megacpt.schedule import check_schedule

    config = validate_config(raw, source=source)
    try:
        check_schedule(config.schedule, config.train.steps)
    except ConfigError as e:
        raise ConfigError(e.key, e.message, source) from None
    return config


def _namer(axes: list[Axis]):
    """NAME = one `SHORTKEYvalue` part per axis, e.g. max_lr3e-4_warmup0_seed1: the last part of the (first)
    dotted key, or the whole key where two axes share it, and the (first) value as written; the whole value,
    or else its position, where that would not make a short, safe and unique file name."""
    shorts = [a.key.split(":")[0].rsplit(".", 1)[-1] for a in axes]
    shorts = [a.key.split(":")[0] if shorts.count(s) > 1 else s for a, s in zip(axes, shorts)]
    parts: dict[str, dict[str, str]] = {}
    for axis, short in zip(axes, shorts):
        parts[axis.key] = {label: f"{short}{part}" for label, part in zip(axis.labels, _name_parts(axis.labels))}
    return lambda labels: "_".join(parts[k][v] for k, v in labels.items()) or "base"


def _name_parts(labels: tuple[str, ...]) -> list[str]:
    for candidate in ([label.split(":")[0] for label in labels], list(labels)):
        safe = [re.sub(r"[^A-Za-z0-9.+-]", "_", c) for c in candidate]
        if len(set(safe)) == len(safe) and all(len(s) <= MAX_LABEL for s in safe):
            return safe
    return [str(i) for i in range(len(labels))]


def _lookup(raw: Any, key: str) -> Any:
    for part in key.split("."):
        raw = raw[part]
    return raw


# ------------------------------------------------------------------------------------ on disk


def write_sweep(sweep: Sweep) -> None:
    """DIR/sweep.json and DIR/configs/NAME.json; a directory holding another sweep is refused untouched."""
    path = sweep.root / MANIFEST
    manifest = sweep.manifest()
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != manifest:
            raise UserError(f"{sweep.root} holds another sweep ({_difference(previous, manifest)}; see {path}); "
                            f"choose another --workdir, or delete this one to start again")
    for run in sweep.runs:
        write_once(sweep.config_path(run.name), run.config)
    if not path.is_file():
        write_manifest(sweep)


def write_manifest(sweep: Sweep) -> None:
    """DIR/sweep.json, replacing any earlier manifest (the demo checks its runs itself, see demo/experiment.py)."""
    write_atomic(sweep.root / MANIFEST, json.dumps(sweep.manifest(), indent=1) + "\n")


def write_once(path: Path, config: dict) -> Path:
    """Write a run config unless the file exists: a config on disk is never overwritten, so edits stick."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(config, indent=1) + "\n")
    return path


def _difference(previous: dict, manifest: dict) -> str:
    if previous.get("axes") != manifest["axes"]:
        return "its axes differ"
    runs = {r["name"]: r for r in previous.get("runs", [])}
    changed = [r["name"] for r in manifest["runs"] if runs.get(r["name"]) != r]
    return f"the config of run {changed[0]} differs" if changed else "its runs differ"


def read_sweep(root: Path) -> Sweep:
    """The sweep a work directory holds, from its manifest."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        what = "does not exist" if not Path(root).exists() else f"holds no {MANIFEST}"
        raise UserError(f"sweep directory {root} {what}: give the --workdir of a `megacpt sweep`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        axes = tuple(Axis(a["key"], tuple(a["labels"])) for a in manifest["axes"])
        runs = tuple(SweepRun(r["name"], r["labels"], r["values"], r["config"]) for r in manifest["runs"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a sweep manifest written by megacpt sweep ({e})") from None
    return Sweep(Path(root).resolve(), axes, runs)
