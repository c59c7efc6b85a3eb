"""Files that appear complete or not at all: write a temporary sibling, flush it to disk, rename it into
place, then flush the directory so the rename itself survives a crash.

Checkpoint states and `latest`, the data commands' outputs, the tools' output folders and every command's
report files go through here. It does not lock: two writers of the same path race (the last rename wins).
"""
from __future__ import annotations

import os
from pathlib import Path

from megacpt.errors import UserError


def fsync_path(path: str | Path) -> None:
    """Flush a file's contents, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(temp: str | Path, final: str | Path) -> None:
    """Rename the complete file or folder `temp` to `final` (replacing it) with both contents and rename on disk.

    A folder is flushed file by file, then folder by folder (a staged checkpoint: weights, config, tokenizer).
    """
    if Path(temp).is_dir():
        for folder, _, names in os.walk(temp, topdown=False):
            for name in names:
                fsync_path(Path(folder, name))
            fsync_path(folder)
    else:
        fsync_path(temp)
    os.replace(temp, final)
    fsync_path(Path(final).absolute().parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        replace_durably(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_output(path: str | Path, text: str, option: str) -> None:
    """A command's output file (CSV, JSON, report), written atomically; a failure names the option and path."""
    try:
        write_atomic(path, text)
    except OSError as e:
        raise UserError(f"cannot write {option} {path}: {e.strerror}") from None
