"""DeepSpeed hostfiles (`HOST slots=N`, one host a line): read and check one before any process starts.

DeepSpeed's own parser accepts `slots=0` and then starts nothing on that host, so a typo silently shrinks
the world; megacpt refuses it, and every line it cannot read, naming the file and the line. Writing
hostfiles is the launch scripts' job (launch/slurm_common.sh), not this module's.
"""
from __future__ import annotations

import re
from pathlib import Path

from megacpt.errors import UserError

_ENTRY = re.compile(r"^(\S+)\s+slots=(\d+)$")


def read_hostfile(path: str | Path) -> dict[str, int]:
    """Host -> slots, in file order. Comments (#) and blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read hostfile {path}: {e.strerror}") from None
    hosts: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENTRY.match(line)
        where = f"hostfile {path} line {number} '{line}'"
        if match is None:
            raise UserError(f"{where}: expected 'HOSTNAME slots=N'")
        host, slots = match.group(1), int(match.group(2))
        if slots == 0:
            raise UserError(f"{where}: every host needs at least one slot (one per GPU it runs a rank on)")
        if host in hosts:
            raise UserError(f"{where}: host '{host}' is listed twice")
        hosts[host] = slots
    if not hosts:
        raise UserError(f"hostfile {path} lists no hosts; expected lines 'HOSTNAME slots=N'")
    return hosts


def uniform_slots(hosts: dict[str, int], path: str | Path) -> int:
    """The slots per host when every host has the same number (what a planned layout assumes)."""
    counts = sorted(set(hosts.values()))
    if len(counts) > 1:
        raise UserError(f"hostfile {path}: hosts have different slot counts {counts}; "
                        "megacpt expects the same number of GPUs on every node")
    return counts[0]
