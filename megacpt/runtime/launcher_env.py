"""The environment a launcher gives each process, in one place (no torch import, so the demo and the tests
can use it cheaply): the variables that place a process in a world, and a free port for a world of one.

`megacpt.runtime.distributed` reads these variables to join a world; a child process that must build its own world
(the demo's runs, the tests' subprocesses) starts without them.
"""
from __future__ import annotations

import os
import socket

# Set by the deepspeed launcher, torchrun and the SLURM launch scripts; DeepSpeed's MPI discovery adds CROSS_*.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_world_env() -> dict[str, str]:
    """This process's environment without the launcher's variables, output unbuffered: for a child process
    that builds its own world (a `megacpt` command run the way a user runs it)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return env
