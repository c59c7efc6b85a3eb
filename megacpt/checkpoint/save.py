"""Save a checkpoint tag: DeepSpeed's files, every rank's RNG state and megacpt's state, then (in `finish`) the
manifest and the `latest` pointer, so a crash at any moment leaves the previous checkpoint in charge.

A write failure (full disk, permissions) removes the partial tag, keeps `latest` and says why. With
`checkpoint.async_save` (checkpoint/async_writer.py) DeepSpeed's files are still being written when `save`
returns; `PendingSave.finish` waits for them (and takes their checksums from the writer) before anything names
the tag. When to save is the loop's business (train/checkpointing.py).
"""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from megacpt.checkpoint import manifest
from megacpt.checkpoint.async_writer import BackgroundWriter
from megacpt.checkpoint.tags import LATEST, is_complete, prune, read_latest, tag_name
from megacpt.errors import UserError
from megacpt.files import write_atomic
from megacpt.policy.stages import CheckpointState, write_state
from megacpt.run_dir import checkpoint_dir


def rng_states() -> dict:
    """Every generator dropout draws from: the default ones and megatron's tensor-parallel tracker."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def save(engine, run_dir: str | Path, step: int, state: CheckpointState, world_rank: int,
         keep_last: int | None) -> "PendingSave":
    """Start a tag: DeepSpeed's files, RNG and state; the returned PendingSave's `finish` completes it (manifest,
    `latest`, retention).

    Call on every rank. A write failure removes the partial tag and raises a UserError saying why
    (no space, permission denied) with `latest` untouched. With checkpoint.async_save DeepSpeed's files are
    still being written when this returns (from a host copy); `finish` waits for them.
    """
    root = checkpoint_dir(run_dir)
    tag = tag_name(step)
    tag_dir = root / tag
    if world_rank == 0 and tag_dir.exists():
        if is_complete(tag_dir):  # only a bug could get here: resumes set newer tags aside first
            raise UserError(f"refusing to write over the complete checkpoint {tag_dir}")
        shutil.rmtree(tag_dir)  # what a crashed save left
    torch.distributed.barrier()
    with _removed_on_write_failure(tag_dir):
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.save(rng_states(), tag_dir / f"rng_rank{world_rank}.pt")
        if world_rank == 0:
            write_state(tag_dir, state)
    return PendingSave(tag_dir, world_rank, keep_last)


@dataclass
class PendingSave:
    """A tag whose DeepSpeed files may still be being written: no manifest yet, `latest` not moved."""

    tag_dir: Path
    world_rank: int
    keep_last: int | None

    def finish(self, engine) -> Path:
        """Wait until this rank's files are written, then manifest, `latest`, retention."""
        writer = engine.checkpoint_engine
        root = self.tag_dir.parent
        with _removed_on_write_failure(self.tag_dir):
            # checkpoint.async_save: wait for the writer (raising what failed in it), take its checksums
            written = writer.finish() if isinstance(writer, BackgroundWriter) else {}
            torch.distributed.barrier()
            _write_manifest(self.tag_dir, self.world_rank, written)
            if self.world_rank == 0:
                write_atomic(root / LATEST, self.tag_dir.name)  # durable: file and folder entry
        if self.world_rank == 0 and self.keep_last:
            prune(root, self.keep_last)
        torch.distributed.barrier()
        return self.tag_dir

    def ready(self, engine, device) -> bool:
        """Whether every rank's files are written, so that `finish` would not wait for a writer (one all-reduce,
        on every rank)."""
        writer = engine.checkpoint_engine
        done = torch.tensor(0 if isinstance(writer, BackgroundWriter) and writer.writing() else 1, device=device)
        torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
        return bool(done.item())


def _write_manifest(tag_dir: Path, world_rank: int, written: dict[str, dict]) -> None:
    """Every rank checksums (and fsyncs) its share of the tag's files that no writer thread described already
    (`written`: this rank's); rank 0 writes the manifest."""
    world = torch.distributed.get_world_size()
    described: list = [None] * world
    torch.distributed.all_gather_object(described, written)
    known = {name: entry for share in described for name, entry in share.items()}
    names = [[name for name in manifest.tag_files(tag_dir) if name not in known] if world_rank == 0 else None]
    torch.distributed.broadcast_object_list(names, src=0)
    shares: list = [None] * world
    torch.distributed.all_gather_object(shares, manifest.describe(tag_dir, names[0][world_rank::world]))
    if world_rank == 0:
        files = {name: entry for share in [known, *shares] for name, entry in share.items()}
        manifest.write_manifest(tag_dir, dict(sorted(files.items())))


_WRITE_FAILURES = ("No space left", "Permission denied", "Read-only", "inline_container", "file write failed",
                   "Parent directory")


@contextmanager
def _removed_on_write_failure(tag_dir: Path) -> Iterator[None]:
    """Turn an I/O failure while writing `tag_dir` into a UserError that says why, after removing the tag.

    torch's writer reports a full disk as `RuntimeError: [enforce fail at inline_container.cc...]`, without
    an errno, so the reason is also read off the folder (free space, write permission).
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not any(w in str(error) for w in _WRITE_FAILURES):
            raise
        root = tag_dir.parent
        reason = write_failure_reason(error, root)
        shutil.rmtree(tag_dir, ignore_errors=True)
        latest = root / LATEST
        kept = (f"`latest` still names {read_latest(root)}" if latest.is_file()
                else "there is no earlier checkpoint")
        raise UserError(f"cannot write checkpoint {tag_dir}: {reason} in {root}. The partial tag was removed and "
                        f"{kept}; make room or fix the folder, then run the same command again to resume") from None


def write_failure_reason(error: BaseException, root: Path) -> str:
    """Why a write into `root` failed, in a few words (no space left on device, permission denied, ...)."""
    code, text = getattr(error, "errno", None), str(error)
    if code == errno.ENOSPC or "No space left" in text or _free_bytes(root) < (1 << 20):
        return "no space left on device"
    if code == errno.EROFS or "Read-only" in text:
        return "read-only file system"
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text or not os.access(root, os.W_OK):
        return "permission denied"
    return getattr(error, "strerror", None) or text


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62
