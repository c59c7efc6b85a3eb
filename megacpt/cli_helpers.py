"""What the command modules share, written once: argparse value types, the `--set` option, text tables and
matplotlib figures (an optional dependency, imported only when a command draws).

A library module: commands import it, it imports no command. Writing output files is megacpt.files.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

from megacpt.errors import UserError
from megacpt.files import check_output


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count, a degree, a number of workers)."""
    return _checked(int, text, lambda v: v >= 1, "must be >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (an index)."""
    return _checked(int, text, lambda v: v >= 0, "must be >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a memory size, a peak FLOP rate)."""
    return _checked(float, text, lambda v: 0 < v < math.inf, "must be a finite number > 0")


def unit_fraction(text: str) -> float:
    """argparse type: a number in (0, 1] (a utilisation)."""
    return _checked(float, text, lambda v: 0 < v <= 1, "must be in (0, 1]")


def closed_fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (a depth into a prompt)."""
    return _checked(float, text, lambda v: 0 <= v <= 1, "must be in [0, 1]")


def _checked(kind, text: str, ok, requirement: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
    return value


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable) into `args.overrides`, for every command that reads a run config."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable)")


def text_table(rows: Sequence[Sequence[object]], headers: Sequence[str] = (), indent: str = "",
               align: Sequence[str] | None = None) -> str:
    """Aligned columns (tabulate's plain format); cells print as given, numbers are not re-formatted.

    `align` gives each column's alignment ("left", "right"); by default every column is left-aligned."""
    from tabulate import tabulate

    table = tabulate([[str(cell) for cell in row] for row in rows], headers=list(headers), tablefmt="plain",
                     disable_numparse=True, colalign=align)
    return "\n".join(indent + line.rstrip() for line in table.splitlines())


def require_matplotlib(what: str) -> None:
    """A UserError naming `what` (a command or an option) unless matplotlib is installed; cheap, so commands
    call it before the work whose result they will draw."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"{what} needs matplotlib: pip install 'megacpt[viz]'")


def new_figure(what: str, **kwargs):
    """A matplotlib Figure (no pyplot state, no display needed) for `what`, which names the command or option."""
    require_matplotlib(what)
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """--overwrite, for every command that writes output files (megacpt.files.check_output is the rule)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that exist (never one the command reads)")


def save_figure(figure, path: str | Path, option: str, overwrite: bool, inputs: Sequence[str | Path] = (),
                dpi: int = 120) -> None:
    """Save `figure` as PNG (or the format the suffix names), checked by `check_output`; a failure names the
    option and path."""
    check_output(path, option, overwrite, inputs)
    try:
        figure.savefig(path, dpi=dpi)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write {option} {path}: {e}") from None
