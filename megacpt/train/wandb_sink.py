"""Weights & Biases as an optional metrics sink: the records of metrics.jsonl, from the main rank only.

Series carry the names metrics.jsonl uses, nested keys joined by '/' (`samples/code`, `eval/prose`), against
the record's own `step` (W&B's internal step counter is not used, so the steps a resumed run logs again do not
collide). The resolved config and the stage history are the W&B run's config. A run dir keeps its W&B run id
in RUN_DIR/wandb_run_id: a resumed stage continues the same W&B run, a new stage (a new run dir) is a new run
in the group of its chain (by default the name of the chain's first stage). Checkpoint paths are logged as
text; nothing is uploaded as an artifact. `check_available` runs at preflight, so a missing package or a
missing login is exit 2 before any compute.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from megacpt.config import WandbConfig
from megacpt.errors import ConfigError, UserError
from megacpt.run_dir import WANDB_RUN_ID
from megacpt.train.metrics import flatten


def check_available(cfg: WandbConfig) -> None:
    """The package imports and, for online mode, a login exists (no network is used to check)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("logging.wandb", "wandb is not installed: pip install 'megacpt[wandb]', or remove the "
                          "logging.wandb section") from None
    if cfg.mode == "online" and not _has_api_key():
        raise ConfigError("logging.wandb.mode", "'online' needs a W&B login: set WANDB_API_KEY or run `wandb login`, "
                          "or use mode 'offline' and `wandb sync` later")


def _has_api_key() -> bool:
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return host in hosts


class WandbSink:
    """One W&B run for one run dir; `write` takes metrics.jsonl records as they are written (a metrics sink)."""

    def __init__(self, run):
        self.run = run
        run.define_metric("*", step_metric="step")

    @classmethod
    def start(cls, cfg: WandbConfig, run_dir: Path, stage_index: int, first_stage_name: str,
              run_config: dict) -> WandbSink:
        """Start (or, when RUN_DIR holds a W&B run id, continue) the run; a failure is a UserError."""
        import wandb

        id_file = run_dir / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        try:
            run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
                group=cfg.group or first_stage_name, tags=[*cfg.tags, f"stage{stage_index}"], mode=cfg.mode,
                dir=str(run_dir), id=run_id, resume="allow", config=run_config,
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        except Exception as e:  # wandb raises its own types for login, network and usage errors
            raise UserError(f"logging.wandb: cannot start the W&B run ({type(e).__name__}: {e})") from None
        id_file.write_text(run_id)
        return cls(run)

    def write(self, record: dict) -> None:
        self.run.log(flatten(record))

    def rewind(self, step: int) -> None:
        pass  # W&B keeps what it was sent; the steps trained again are logged again at their own step

    def checkpoint_saved(self, step: int, path: Path) -> None:
        """The path as text at its step (not an artifact: a 10B checkpoint is not uploaded silently)."""
        self.run.log({"step": step, "checkpoint": str(path)})

    def close(self) -> None:
        self.run.finish()

