"""Checkpoint tags on disk: their names, the `latest` pointer, finding the tag a path means, verifying it against
its manifest, setting newer tags aside and pruning old ones.

A tag folder (`stepNNNNNNNN`) holds what `engine.save_checkpoint` writes, `megacpt_state.json`, one RNG file
per rank and, written last, `manifest.json` (manifest.py). `latest` names the newest complete tag and moves
only after the manifest is on disk. Every loader opens a tag through `open_tag`, which verifies it first.
This module imports neither torch nor DeepSpeed; save.py and load.py move the tensors.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from megacpt.checkpoint import manifest
from megacpt.errors import UserError
from megacpt.files import write_atomic
from megacpt.policy.stages import STATE_FILE

LATEST = "latest"
_TAG = re.compile(r"step\d{8}")


def tag_name(step: int) -> str:
    return f"step{step:08d}"


def list_tags(root: Path) -> list[Path]:
    """The tag folders of a checkpoints folder, oldest first, complete or not."""
    return sorted(p for p in root.iterdir() if p.is_dir() and _TAG.fullmatch(p.name)) if root.is_dir() else []


def is_complete(tag_dir: Path) -> bool:
    """A save that finished: it wrote its manifest (which may still fail to verify)."""
    return (tag_dir / manifest.MANIFEST).is_file()


def newest_verified(root: Path, before: str | None = None) -> Path | None:
    """The newest tag of `root` (older than tag `before`, if given) that verifies completely."""
    for tag_dir in reversed(list_tags(root)):
        if (before is None or tag_dir.name < before) and not manifest.problems(tag_dir):
            return tag_dir
    return None


def _use_hint(key: str, tag_dir: Path) -> str:
    """How to load `tag_dir` instead, in the terms of the key that chose the damaged one."""
    if key in ("run_dir", "checkpoint.load_tag"):
        return (f"resume from it with --set checkpoint.load_tag={tag_dir.name} (newer tags are then moved aside, "
                "not overwritten)")
    return f"give {key} {tag_dir}"


def read_latest(root: Path) -> str | None:
    """The tag name RUN/checkpoints/latest holds, or None when it holds something else (binary garbage, text that
    names no tag): a damaged pointer, never followed."""
    try:
        name = (root / LATEST).read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return name if _TAG.fullmatch(name) else None


def resolve_tag(path: str | Path, key: str = "init.checkpoint") -> Path:
    """A checkpoints folder (follow its `latest`) or one tag folder in it -> the tag folder (not yet verified)."""
    path = Path(path)
    if (path / STATE_FILE).is_file() or is_complete(path) or (_TAG.fullmatch(path.name) and path.is_dir()):
        return path
    latest = path / LATEST
    if latest.is_file():
        name = read_latest(path)
        if name is None:
            raise UserError(f"{key}: {latest} holds no tag name (it is damaged){_newest_complete(path, key)}")
        tag = path / name
        if is_complete(tag) or (tag / STATE_FILE).is_file():  # the loaders verify it (open_tag)
            return tag
        raise UserError(f"{key}: {latest} names {tag}, which is not a complete checkpoint{_newest_complete(path, key)}")
    if not path.exists():
        raise UserError(f"{key}: checkpoint path {path} does not exist")
    if any(is_complete(t) for t in list_tags(path)):
        raise UserError(f"{key}: {path} holds checkpoint tags but no '{LATEST}' pointer{_newest_complete(path, key)}")
    raise UserError(f"{key}: {path} is neither a megacpt checkpoint tag (no {STATE_FILE}) nor a checkpoints folder (no "
                    f"'{LATEST}')")


def _newest_complete(root: Path, key: str) -> str:
    found = newest_verified(root)
    if found is None:
        return f"; no tag in {root} verifies (`megacpt checkpoint verify {root}` lists them)"
    return f"; the newest tag that verifies is {found.name}: {_use_hint(key, found)}"


def verify_tag(tag_dir: Path, key: str, checksums: bool = True) -> None:
    """Check the tag against its manifest; a damaged or unfinished tag is a UserError naming the file and the
    newest older tag that verifies."""
    found = manifest.problems(tag_dir, checksums)
    if not found:
        return
    older = newest_verified(tag_dir.parent, before=tag_dir.name)
    alternative = (f"the newest older tag that verifies is {older.name}: {_use_hint(key, older)}" if older
                   else f"no older tag in {tag_dir.parent} verifies")
    raise UserError(f"{key}: checkpoint {tag_dir} does not verify: {'; '.join(found[:3])}"
                    f"{'; ...' if len(found) > 3 else ''}. {alternative}")


def open_tag(path: str | Path, key: str = "init.checkpoint", checksums: bool = True) -> Path:
    """resolve_tag, then verify_tag: the tag folder every loader (train, eval, the tools) reads from."""
    tag_dir = resolve_tag(path, key)
    verify_tag(tag_dir, key, checksums)
    return tag_dir


def set_aside_newer(tag_dir: Path) -> list[Path]:
    """Before resuming from an older tag: move newer complete tags to NAME.superseded (never written over or
    deleted) and point `latest` at `tag_dir`. Returns the new names."""
    moved = []
    for newer in list_tags(tag_dir.parent):
        if newer.name > tag_dir.name and is_complete(newer):
            target = newer.with_name(newer.name + ".superseded")
            n = 1
            while target.exists():
                n += 1
                target = newer.with_name(f"{newer.name}.superseded{n}")
            os.replace(newer, target)
            moved.append(target)
    latest = tag_dir.parent / LATEST
    if not latest.is_file() or latest.read_text().strip() != tag_dir.name:
        write_atomic(latest, tag_dir.name)
    return moved


def prune(root: Path, keep_last: int) -> None:
    """Remove the oldest complete tags beyond `keep_last` (never the one `latest` names)."""
    latest = (root / LATEST).read_text().strip()
    tags = [t for t in list_tags(root) if is_complete(t)]
    for old in tags[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old)
