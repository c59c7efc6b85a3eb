"""Checkpoint manifests: every file of a tag with its size and CRC32C, written last and checked before a load.

A save writes `manifest.json` only after every file of the tag is on disk (each fsynced), then fsyncs the tag
folder; `latest` moves after that. So a tag without a manifest is a save that did not finish, and a tag whose
files disagree with its manifest (missing, truncated, altered) is damaged: both are reported with the file's
name instead of the unpickling trace torch would give. CRC32C (hardware-accelerated in the `crc32c` package)
runs at about 10 GB/s in memory, so checking is bound by reading the files, which the load does anyway.
This module knows nothing about DeepSpeed or megacpt's state: it checks files.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import crc32c

from megacpt.files import write_atomic

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 16 << 20


def checksum(path: Path, sync: bool = False) -> str:
    """CRC32C of a file as 8 hex digits; with `sync`, also fsync it (the save's durability point)."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = crc32c.crc32c(chunk, value)
        if sync:
            os.fsync(f.fileno())
    return f"{value:08x}"


def tag_files(tag_dir: Path) -> list[str]:
    """Every file under the tag (relative paths, sorted), the manifest itself and temporary files excepted."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not is_temporary(p.name))


def is_temporary(name: str) -> bool:
    """What a crash left in a checkpoints folder: a temporary file of an atomic write (`files.write_atomic`,
    `.NAME.tmp-PID`) or the staging folder of a universal conversion (elastic.py, `.TAG.universal-PID`)."""
    return re.fullmatch(r"\..+\.(tmp|universal)-\d+", name) is not None


def entry(path: Path) -> dict:
    """A file's manifest entry, {size, crc32c}; the file is fsynced on the way."""
    return {"size": path.stat().st_size, "crc32c": checksum(path, sync=True)}


def describe(tag_dir: Path, names: list[str]) -> dict[str, dict]:
    """{name: entry} for these files of the tag."""
    return {name: entry(tag_dir / name) for name in names}


def write_manifest(tag_dir: Path, files: dict[str, dict]) -> None:
    """Write the manifest atomically and durably (file and folder entry): the tag is complete after this."""
    write_atomic(tag_dir / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))


def problems(tag_dir: Path, checksums: bool = True) -> list[str]:
    """What is wrong with a tag (empty when it verifies): no manifest, or files missing, truncated or altered."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return [f"{tag_dir} has no {MANIFEST}: its save did not finish"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{tag_dir / MANIFEST} is unreadable ({e})"]
    found = []
    for name, entry in files.items():
        path = tag_dir / name
        if not path.is_file():
            found.append(f"{path} is missing")
        elif path.stat().st_size != entry["size"]:
            found.append(f"{path} is {path.stat().st_size} bytes, the manifest says {entry['size']} "
                         "(truncated or rewritten)")
        elif checksums and (actual := checksum(path)) != entry["crc32c"]:
            found.append(f"{path} fails its checksum (crc32c {actual}, the manifest says {entry['crc32c']})")
    return found
