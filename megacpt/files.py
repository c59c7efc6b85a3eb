"""Files that appear complete or not at all: write a temporary sibling, flush it to disk, rename it into
place, then flush the directory so the rename itself survives a crash.

Checkpoint states and `latest`, the data commands' outputs, the tools' output folders and every command's
report files go through here. It does not lock: two writers of the same path race (the last rename wins).
The logs a run grows a line at a time (metrics.jsonl, samples.jsonl) are `LineFile`s.

`check_output` is the one rule for every file or folder a command writes: an existing one is replaced only
with --overwrite, and one that is, contains or lies inside an input of the command never.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from megacpt.errors import ConfigError, UserError


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


def check_writable_folder(folder: Path, key: str) -> None:
    """`folder` (the value of config key `key`, or of a command's option `--key`) is a folder this process can
    write, or can create: refuse files and read-only places (os.access also sees a read-only file system, where
    root cannot write either)."""
    def refuse(message: str) -> UserError:
        return UserError(f"{key} {message}") if key.startswith("--") else ConfigError(key, message)

    if folder.exists() and not folder.is_dir():
        raise refuse(f"{folder} is a file, not a folder")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise refuse(f"cannot create {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write to" if existing == folder else f"create {folder} in"
        raise refuse(f"cannot {what} {existing}: permission denied")


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError in the block names `path` (a failed write to an open file, or to a temporary sibling, names
    none, or not the file the caller writes): the message of a full disk can say which file it was."""
    try:
        yield
    except OSError as e:
        e.filename = str(path)
        raise


def write_atomic(path: str | Path, data: str | bytes | Iterable[str]) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part. `data` may
    be an iterable of text chunks, written as they come (a long file need not be built in memory)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming(path), open(temp, "wb") as f:
            for chunk in [data] if isinstance(data, (str, bytes)) else data:
                f.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
        with naming(path):
            replace_durably(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def check_output(path: str | Path, option: str, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse a command's output `path` (given as `option`) that exists, unless `overwrite`, or that is, contains
    or lies inside one of the command's `inputs` (compared as resolved paths), whatever `overwrite` says."""
    output = Path(path).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if output == source or output in source.parents or source in output.parents:
            how = "is" if output == source else "contains" if output in source.parents else "lies inside"
            raise UserError(f"{option} {path} {how} the input {given}: writing it would destroy what the command "
                            "reads (--overwrite does not allow that); choose another path")
    if output.exists() and not overwrite:
        raise UserError(f"{option} {path} already exists; choose another path or pass --overwrite")


def write_output(path: str | Path, text: str, option: str, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """A command's output file (CSV, JSON, report), checked by `check_output` and written atomically; a failure
    names the option and path."""
    check_output(path, option, overwrite, inputs)
    try:
        write_atomic(path, text)
    except OSError as e:
        raise UserError(f"cannot write {option} {path}: {e.strerror}") from None


class LineFile:
    """A log that grows a line at a time (metrics.jsonl, samples.jsonl), continued where it ends.

    Unbuffered: each line reaches the file (the page cache) as it is written, so a write that fails (a full
    disk) raises there, naming the file, and leaves nothing pending that closing the file would try again and
    fail on with another error. A line the disk had room for only in part is left torn at the end."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with naming(self.path):
            self.file = open(self.path, "ab", buffering=0)

    def write(self, line: str) -> None:
        data = memoryview(line.encode("utf-8"))
        with naming(self.path):
            while data:  # an unbuffered write may take part of it
                data = data[self.file.write(data):]

    def close(self) -> None:
        self.file.close()
