"""Reading documents from jsonl, Parquet and plain-text files: the one reader behind `preprocess` and `tokenizer
train`.

The format is chosen by the file name:

- `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one JSON object per line, the document being the string under
  `json_key`; blank lines are skipped.
- `.parquet` (FineWeb, RedPajama-style dumps): one document per row, the string in the column named
  `json_key`; read one row group at a time with pyarrow (the 'parquet' extra), null rows skipped.
- `.txt`: the whole file is one document (a corpus of many documents belongs in jsonl, or in many files).

Every problem is a UserError naming the file and, for jsonl, the line (for Parquet, the row). This module does
not tokenize.
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from megacpt.errors import UserError

try:  # optional: only .jsonl.zst inputs need it
    import zstandard
except ImportError:
    zstandard = None

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
# PREFIX.bytes.npy beside a dataset's PREFIX.bin/.idx: the UTF-8 bytes of each document's text (int64), written by
# `megacpt preprocess` so that validation can report bits per byte.
DOCUMENT_BYTES_SUFFIX = ".bytes.npy"
TEXT_SUFFIXES = (".txt",)
_READ_ERRORS = (OSError, EOFError, zlib.error) + ((zstandard.ZstdError,) if zstandard else ())


def iter_documents(paths: Sequence[str | Path], json_key: str = "text") -> Iterator[str]:
    """The documents of `paths`, in order.

    Every file is checked now, so a missing or unsupported one fails before any work is done; the contents are
    read lazily, one line at a time, so inputs larger than memory are fine.
    """
    if not paths:
        raise UserError("no input files given")
    files = [_check_input(path) for path in paths]
    return _read(files, json_key)


def _check_input(path: str | Path) -> Path:
    """`path` as a Path if it is an existing file in a supported format, else a UserError saying what is wrong."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"input file {file} does not exist")
    if not file.is_file():
        raise UserError(f"input {file} is not a file")
    if not file.name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES):
        raise UserError(f"input file {file} has an unsupported name; expected one ending in "
                        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)}")
    if file.name.endswith(PARQUET_SUFFIXES):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UserError(f"input file {file} is Parquet, which needs the 'pyarrow' package (pip install "
                            "megacpt[parquet])") from None
    if file.name.endswith(".zst") and zstandard is None:
        raise UserError(f"input file {file} is zstd-compressed, which needs the 'zstandard' package (pip install "
                        "zstandard)")
    return file


def _read(files: list[Path], json_key: str) -> Iterator[str]:
    for file in files:
        if file.name.endswith(TEXT_SUFFIXES):
            yield _read_text(file)
        elif file.name.endswith(PARQUET_SUFFIXES):
            yield from _read_parquet(file, json_key)
        else:
            yield from _read_jsonl(file, json_key)


def _read_text(file: Path) -> str:
    try:
        data = file.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read input file {file}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{file}, line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None


def _read_jsonl(file: Path, json_key: str) -> Iterator[str]:
    try:
        with _open_binary(file) as stream:
            for number, raw in enumerate(stream, 1):
                if raw.strip():
                    yield _parse_line(raw, json_key, f"{file}, line {number}")
    except _READ_ERRORS as e:
        raise UserError(f"cannot read input file {file}: {e}") from None


def _read_parquet(file: Path, column: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
        if column not in names:
            raise UserError(f"{file}: no column '{column}' (its columns: {', '.join(names)}); choose the text "
                            "column with --json-key")
        kind = parquet.schema_arrow.field(column).type
        if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
            raise UserError(f"{file}: column '{column}' holds {kind}, expected strings")
        for group in range(parquet.num_row_groups):
            for text in parquet.read_row_group(group, columns=[column]).column(0).to_pylist():
                if text is not None:
                    yield text
    except (OSError, pyarrow.ArrowException) as e:
        raise UserError(f"cannot read input file {file}: {e}") from None


def _open_binary(file: Path) -> BinaryIO:
    if file.name.endswith(".gz"):
        return gzip.open(file, "rb")
    if file.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(open(file, "rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(raw)
    return open(file, "rb")


def _parse_line(raw: bytes, json_key: str, where: str) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a '{json_key}' key, got {line.strip()[:40]}")
    if json_key not in record:
        keys = ", ".join(f"'{k}'" for k in record) or "none"
        raise UserError(f"{where}: no key '{json_key}' (its keys: {keys}); choose the text key with --json-key")
    text = record[json_key]
    if not isinstance(text, str):
        raise UserError(f"{where}: '{json_key}' holds {json.dumps(text)[:40]}, expected a string")
    return text
