"""The demo's two corpora, built from what every CPython installation carries: English prose and Python code.

- prose: the reference-manual topics of `pydoc_data.topics` and the docstrings of the standard library;
- code: the standard library's source with its docstrings and comments removed, so that the two corpora share
  as little text as possible and the switch from one to the other is a real distribution shift.

Source files are read and parsed with `ast` and `tokenize`, never imported. Everything is in sorted order and
the train/validation split is a hash of each document's text, so a given Python version gives the same
corpora on every machine. This module writes jsonl files; tokenizing them is `megacpt preprocess`'s job.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from megacpt.files import replace_durably

# Folders of the standard library that are tests, data tables, generated or bundled code, not library source.
SKIP_PARTS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "encodings",
                        "pydoc_data", "turtledemo", "ensurepip", "__phello__", "__pycache__"})
SKIP_PREFIXES = ("config-", "_sysconfigdata")
CORPORA = ("prose", "code")
SPLITS = ("train", "val")
CHUNK_CHARS = 3000  # documents longer than this are split at blank lines (about 1,000 tokens)
VALIDATION_PERCENT = 5


@dataclass(frozen=True)
class CorpusStats:
    """What `write_corpora` wrote, for the demo's progress line."""

    name: str
    train: int
    validation: int
    chars: int


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files in sorted order, tests and other noise left out."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    return sorted(p for p in root.rglob("*.py")
                  if not SKIP_PARTS.intersection(p.relative_to(root).parts[:-1])
                  and not p.relative_to(root).parts[0].startswith(SKIP_PREFIXES))


def _parse(path: Path) -> tuple[str, ast.Module] | None:
    """(source, tree), or None for a file this Python cannot read or parse (skipped, not an error)."""
    try:
        with tokenize.open(path) as f:
            source = f.read()
        return source, ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None


def _documented(tree: ast.Module) -> Iterator[ast.AST]:
    """The module and every class and function in it: the nodes that can carry a docstring."""
    yield tree
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _docstring_node(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", [])
    if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        return body[0]
    return None


def docstrings_text(tree: ast.Module) -> str:
    """All docstrings of a module, in source order, separated by blank lines."""
    texts = (ast.get_docstring(node) for node in _documented(tree))
    return "\n\n".join(t.strip() for t in texts if t and t.strip())


def strip_code(source: str, tree: ast.Module) -> str:
    """`source` without docstrings and comments, layout otherwise kept.

    A docstring that is the whole body of a class or function becomes `pass`, so the code stays valid Python.
    Lines that held only a removed docstring or comment disappear; runs of blank lines shrink to one.
    """
    lines = source.splitlines()
    cuts: dict[int, list[tuple[int, int, str]]] = {}  # 0-based line -> (start col, end col, replacement)

    def cut(start: tuple[int, int], end: tuple[int, int], replacement: str = "") -> None:
        (l0, c0), (l1, c1) = start, end
        for line in range(l0, l1 + 1):
            cuts.setdefault(line, []).append((c0 if line == l0 else 0, c1 if line == l1 else len(lines[line]),
                                              replacement if line == l0 else ""))

    for node in _documented(tree):
        doc = _docstring_node(node)
        if doc is not None:
            sole = len(node.body) == 1 and not isinstance(node, ast.Module)
            cut(_char_pos(lines, doc.lineno, doc.col_offset), _char_pos(lines, doc.end_lineno, doc.end_col_offset),
                "pass" if sole else "")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            cut((token.start[0] - 1, token.start[1]), (token.end[0] - 1, token.end[1]))

    out: list[str] = []
    for i, line in enumerate(lines):
        kept = line
        for c0, c1, replacement in sorted(cuts.get(i, ()), reverse=True):
            kept = kept[:c0] + replacement + kept[c1:]
        kept = kept.rstrip()
        if kept or not line.strip():  # drop lines emptied by a cut, keep the original blank lines
            if kept or (out and out[-1]):
                out.append(kept)
    return "\n".join(out).strip("\n") + "\n"


def _char_pos(lines: list[str], lineno: int, byte_col: int) -> tuple[int, int]:
    """ast's (1-based line, UTF-8 byte column) as (0-based line, character column)."""
    line = lines[lineno - 1]
    return lineno - 1, len(line.encode("utf-8")[:byte_col].decode("utf-8"))


def chunk(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Split at blank lines into pieces of at most `max_chars`; a longer paragraph is split at lines (and a
    single line longer than that stays whole)."""
    pieces, current = [], ""
    for block in _blocks(text, max_chars):
        if current and len(current) + len(block) + 2 > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{block}" if current else block
    if current:
        pieces.append(current)
    return pieces


def _blocks(text: str, max_chars: int) -> Iterator[str]:
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if len(paragraph) <= max_chars:
            yield paragraph
            continue
        part: list[str] = []
        size = 0
        for line in paragraph.splitlines():
            if part and size + len(line) + 1 > max_chars:
                yield "\n".join(part)
                part, size = [], 0
            part.append(line)
            size += len(line) + 1
        if part:
            yield "\n".join(part)


def is_validation(text: str, percent: int = VALIDATION_PERCENT) -> bool:
    """The split: a hash of the text (stable across processes and machines, unlike the salted hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100 < percent


def prose_documents(files: Iterable[Path]) -> Iterator[str]:
    """Reference-manual topics (sorted by name), then each module's docstrings, chunked."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from chunk(topics[name])
    for path in files:
        parsed = _parse(path)
        if parsed is not None:
            yield from chunk(docstrings_text(parsed[1]))


def code_documents(files: Iterable[Path]) -> Iterator[str]:
    """Each module's source without docstrings and comments, chunked."""
    for path in files:
        parsed = _parse(path)
        if parsed is not None:
            yield from chunk(strip_code(*parsed))


def write_corpora(folder: Path, max_chars: int | None = None) -> list[CorpusStats]:
    """FOLDER/{prose,code}_{train,val}.jsonl. `max_chars` caps each corpus (in document order) for quick runs.

    Each file is parsed twice (once per corpus): simpler than interleaving the writers, and a few seconds.
    """
    files = stdlib_files()
    folder.mkdir(parents=True, exist_ok=True)
    documents = {"prose": prose_documents(files), "code": code_documents(files)}
    return [_write_split(folder, name, documents[name], max_chars) for name in CORPORA]


def _write_split(folder: Path, name: str, documents: Iterable[str], max_chars: int | None) -> CorpusStats:
    """NAME_train.jsonl and NAME_val.jsonl, each renamed into place only when both are complete."""
    counts = dict.fromkeys(SPLITS, 0)
    chars = 0
    paths = {split: corpus_path(folder, name, split) for split in SPLITS}
    temps = {split: path.with_suffix(".jsonl.tmp") for split, path in paths.items()}
    with open(temps["train"], "w", encoding="utf-8") as train, open(temps["val"], "w", encoding="utf-8") as val:
        for text in documents:
            if max_chars is not None and chars >= max_chars:
                break
            split = "val" if is_validation(text) else "train"
            (val if split == "val" else train).write(json.dumps({"text": text}) + "\n")
            counts[split] += 1
            chars += len(text)
    for split in SPLITS:
        replace_durably(temps[split], paths[split])
    return CorpusStats(name, counts["train"], counts["val"], chars)


def corpus_path(folder: Path, name: str, split: str) -> Path:
    return folder / f"{name}_{split}.jsonl"
