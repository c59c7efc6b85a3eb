"""`megacpt preprocess`: tokenize jsonl/txt documents into a Megatron indexed dataset (PREFIX.bin / PREFIX.idx).

Beside them, PREFIX.bytes.npy holds the UTF-8 bytes of each written document's text, for bits per byte.

Reading is documents.py's job and tokenizing tokenizers.py's; this module runs the tokenizer over a pool of
worker processes and writes through megatron-core's `IndexedDatasetBuilder`, one indexed document per input
document, in input order whatever the worker count. A document that tokenizes to nothing is skipped and
counted (a zero-length document holds no sample); with `--append-eod` every written document ends with EOD.
The output appears only once it is complete (output_files.py).
"""
from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from megacpt.cli_helpers import positive_int
from megacpt.config import TokenizerConfig
from megacpt.data.documents import DOCUMENT_BYTES_SUFFIX, iter_documents
from megacpt.data.output_files import atomic_outputs
from megacpt.data.tokenizers import Tokenizer, build_tokenizer
from megacpt.errors import UserError

PROGRESS_SECONDS = 2.0
CHUNK_DOCUMENTS = 64  # documents per task sent to a worker: large enough to amortise the pickling round trip


@dataclass(frozen=True)
class PreprocessResult:
    """What one preprocessing run wrote."""

    documents: int
    empty_skipped: int
    tokens: int
    seconds: float
    files: tuple[str, ...]  # PREFIX.bin, PREFIX.bytes.npy, PREFIX.idx

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        skipped = f"; skipped {self.empty_skipped:,} empty documents" if self.empty_skipped else ""
        return (f"preprocess: wrote {self.documents:,} documents, {self.tokens:,} tokens in {self.seconds:.1f} s "
                f"({self.tokens_per_s:,.0f} tokens/s) to {', '.join(self.files)}{skipped}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="documents: .jsonl, .jsonl.gz, .jsonl.zst (one JSON object per line), .parquet (one "
                             "per row, the --json-key column) or .txt (one document per file)")
    parser.add_argument("--tokenizer-type", required=True, choices=["sentencepiece", "hf", "byte"])
    parser.add_argument("--tokenizer-model", metavar="PATH",
                        help="the .model file (sentencepiece) or tokenizer.json (hf); not used by byte")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.bytes.npy")
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N",
                        help="tokenizer processes; 1 tokenizes in this process (default)")
    parser.add_argument("--json-key", default="text", metavar="KEY",
                        help="key of the document text in each jsonl line (default: text)")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's EOD token")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")


def run(args: argparse.Namespace) -> int:
    result = preprocess(
        args.input,
        tokenizer_config(args.tokenizer_type, args.tokenizer_model),
        args.output_prefix,
        workers=args.workers,
        json_key=args.json_key,
        append_eod=args.append_eod,
        overwrite=args.overwrite,
    )
    print(result.summary())
    return 0


def tokenizer_config(tokenizer_type: str, model: str | None) -> TokenizerConfig:
    """The config section that the --tokenizer-type/--tokenizer-model flags stand for."""
    if tokenizer_type == "byte":
        if model:
            raise UserError("--tokenizer-type byte needs no --tokenizer-model; leave it out")
        return TokenizerConfig(type="byte")
    if not model:
        raise UserError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model PATH")
    key = "model" if tokenizer_type == "sentencepiece" else "path"
    return TokenizerConfig(type=tokenizer_type, **{key: model})


def preprocess(
    inputs: Sequence[str],
    tokenizer_config: TokenizerConfig,
    output_prefix: str,
    *,
    workers: int = 1,
    json_key: str = "text",
    append_eod: bool = False,
    overwrite: bool = False,
    log: TextIO = sys.stderr,
) -> PreprocessResult:
    """Tokenize the documents of `inputs` into OUTPUT_PREFIX.bin/.idx.

    Inputs, tokenizer and outputs are checked first."""
    texts = iter_documents(inputs, json_key)
    tokenizer = build_tokenizer(tokenizer_config)
    with atomic_outputs(output_prefix, (".bin", DOCUMENT_BYTES_SUFFIX, ".idx"), overwrite, inputs) as temp_prefix:
        optimal_dtype, builder_class = _megatron_builder()
        encoder = _DocumentEncoder(tokenizer, append_eod, optimal_dtype(tokenizer.vocab_size))
        print(f"preprocess: {tokenizer.describe()}; {np.dtype(encoder.dtype).name} tokens; {workers} worker(s)",
              file=log, flush=True)
        start = time.monotonic()
        builder = builder_class(temp_prefix + ".bin", dtype=encoder.dtype)
        with _encoded(texts, encoder, tokenizer_config, workers) as encoded:
            documents, empty, tokens, sizes = _add_documents(builder, encoded, start, log)
        if documents == 0:
            inputs_text = ", ".join(map(str, inputs))
            raise UserError(f"no documents to write: all {empty} documents of {inputs_text} are empty after "
                            "tokenization"
                            if empty else f"no documents in {inputs_text}")
        np.save(temp_prefix + DOCUMENT_BYTES_SUFFIX, np.asarray(sizes, dtype=np.int64))
        builder.finalize(temp_prefix + ".idx")
    seconds = time.monotonic() - start
    return PreprocessResult(documents, empty, tokens, seconds,
                            tuple(output_prefix + suffix for suffix in (".bin", DOCUMENT_BYTES_SUFFIX, ".idx")))


def _add_documents(builder, encoded: Iterable[tuple[np.ndarray, int]], start: float,
                   log: TextIO) -> tuple[int, int, int, list[int]]:
    """Add each non-empty array as one document, reporting progress.

    Returns (documents, empty skipped, tokens, UTF-8 bytes of each written document's text)."""
    documents = empty = tokens = 0
    sizes = []
    next_report = start + PROGRESS_SECONDS
    for array, size in encoded:
        if array.size == 0:
            empty += 1
            continue
        builder.add_document(array, [array.size])
        sizes.append(size)
        documents += 1
        tokens += array.size
        now = time.monotonic()
        if now >= next_report:
            next_report = now + PROGRESS_SECONDS
            print(f"preprocess: {documents:,} documents, {tokens:,} tokens, {tokens / (now - start):,.0f} tokens/s",
                  file=log, flush=True)
    return documents, empty, tokens, sizes


class _DocumentEncoder:
    """Text to a token array in the dataset's dtype, EOD appended when asked: the work one worker does."""

    def __init__(self, tokenizer: Tokenizer, append_eod: bool, dtype: type[np.number]):
        self.tokenizer = tokenizer
        self.append_eod = append_eod
        self.dtype = dtype

    def __call__(self, text: str) -> tuple[np.ndarray, int]:
        """The document's token array and the UTF-8 bytes of its text."""
        ids = self.tokenizer.encode(text)
        if ids and self.append_eod:
            ids = [*ids, self.tokenizer.eod_id]
        return np.asarray(ids, dtype=self.dtype), len(text.encode("utf-8"))


@contextmanager
def _encoded(texts: Iterable[str], encoder: _DocumentEncoder, config: TokenizerConfig,
             workers: int) -> Iterator[Iterator[tuple[np.ndarray, int]]]:
    """(token array, bytes) of `texts` in input order: in this process, or from a pool of `workers` processes.

    Workers are spawned, not forked: the parent has torch and its threads loaded by now, and a spawned worker
    imports only the tokenizer. Each builds its own tokenizer from `config`.
    """
    if workers == 1:
        yield map(encoder, texts)
        return
    context = multiprocessing.get_context("spawn")
    initargs = (config, encoder.append_eod, encoder.dtype)
    with context.Pool(workers, initializer=_start_worker, initargs=initargs) as pool:
        yield pool.imap(_encode_in_worker, texts, chunksize=CHUNK_DOCUMENTS)


_worker_encoder: _DocumentEncoder | None = None


def _start_worker(config: TokenizerConfig, append_eod: bool, dtype: type[np.number]) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it terminates the pool
    _worker_encoder = _DocumentEncoder(build_tokenizer(config), append_eod, dtype)


def _encode_in_worker(text: str) -> tuple[np.ndarray, int]:
    return _worker_encoder(text)


def _megatron_builder():
    """megatron-core's dtype rule and builder, imported only when writing (it pulls in torch)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return DType.optimal_dtype, IndexedDatasetBuilder
