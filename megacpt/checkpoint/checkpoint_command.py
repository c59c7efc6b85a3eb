"""`megacpt checkpoint verify RUN_DIR_OR_TAG [--clean]`: check tags against their manifests.

Given a tag, checks that tag; given a run dir or its checkpoints folder, checks every tag, says which one
`latest` names, and lists what a crash left behind: tag folders whose save did not finish (no manifest) and
the temporary files of interrupted atomic writes (`.latest.tmp-PID`). Those are never loaded; `--clean`
removes them (holding the run dir's lock, so never under a running save). A damaged complete tag is
reported, not removed. Exit 2 when a complete tag fails to verify or `latest` names no usable tag.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from megacpt.checkpoint import manifest
from megacpt.checkpoint import tags as checkpoint_tags
from megacpt.errors import UserError
from megacpt.run_dir import CHECKPOINTS, checkpoint_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser("verify", help="check one tag, or every tag of a run, against its manifest")
    verify.add_argument("path", metavar="RUN_DIR_OR_TAG", help="a run dir, its checkpoints folder, or one tag folder")
    verify.add_argument("--clean", action="store_true",
                        help="remove unfinished tag folders and stale temporary files (never a complete tag)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder (give a run dir, its checkpoints folder or one tag folder)")
    if checkpoint_tags.is_complete(path) or (path / checkpoint_tags.STATE_FILE).is_file():
        found = manifest.problems(path)
        print(f"{path}: {'ok' if not found else 'DAMAGED'}")
        if found:
            raise UserError(f"checkpoint {path} does not verify: {'; '.join(found)}")
        return 0
    root = checkpoint_dir(path) if checkpoint_dir(path).is_dir() else path
    tags = checkpoint_tags.list_tags(root)
    if not tags and not (root / checkpoint_tags.LATEST).is_file():
        raise UserError(f"{path} holds no checkpoint tags (step########) and no '{checkpoint_tags.LATEST}'")
    damaged, leftovers = [], []
    for tag_dir in tags:
        if not checkpoint_tags.is_complete(tag_dir):
            leftovers.append(tag_dir)
            print(f"{tag_dir.name}: unfinished save (no {manifest.MANIFEST}); never loaded")
            continue
        found = manifest.problems(tag_dir)
        damaged += found
        print(f"{tag_dir.name}: " + ("ok" if not found else "DAMAGED: " + "; ".join(found)))
    for stale in sorted(p for p in root.iterdir() if manifest.is_temporary(p.name)):
        leftovers.append(stale)
        print(f"{stale.name}: left by a crash during an atomic write (e.g. of `latest`) or a universal "
              "conversion; never read")
    latest_problem = _latest_problem(root)
    if latest_problem or (root / checkpoint_tags.LATEST).is_file():
        print(latest_problem or f"latest: {checkpoint_tags.read_latest(root)}")
    else:
        print("latest: none yet (no save has completed: nothing to resume, nothing lost)")
    if args.clean and leftovers:
        _clean(root, leftovers)
    if damaged or latest_problem:
        good = checkpoint_tags.newest_verified(root)
        raise UserError(f"{root}: {len(damaged)} damaged file(s){'; ' + latest_problem if latest_problem else ''}; "
                        + (f"the newest tag that verifies is {good.name}" if good else "no tag verifies"))
    return 0


def _latest_problem(root: Path) -> str | None:
    latest = root / checkpoint_tags.LATEST
    if not latest.is_file():  # a problem once a save has completed; before that (a crash in the first) nothing is lost
        complete = any(checkpoint_tags.is_complete(t) for t in checkpoint_tags.list_tags(root))
        return f"no '{checkpoint_tags.LATEST}' pointer" if complete else None
    name = checkpoint_tags.read_latest(root)
    if name is None:
        return f"'{checkpoint_tags.LATEST}' holds no tag name (damaged)"
    if not checkpoint_tags.is_complete(root / name) or manifest.problems(root / name, checksums=False):
        return f"'{checkpoint_tags.LATEST}' names {name}, which is not a complete tag that verifies"
    return None


def _clean(root: Path, leftovers: list[Path]) -> None:
    """Remove what crashed saves left, holding the run's lock when `root` is a run's checkpoints folder."""
    from megacpt import run_dir

    with run_dir.hold(root.parent if root.name == CHECKPOINTS else root):
        for item in leftovers:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
            print(f"removed {item}")
