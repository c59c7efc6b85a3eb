"""Preprocessing throughput: tokens/s of `megacpt preprocess` with 1 and 2 workers on synthetic English.

Generates DOCUMENTS pseudo-English documents from the words of Python's stdlib docstrings (so the text has
a natural word-frequency curve), trains a SentencePiece BPE model on the first 2,000 of them with `megacpt
tokenizer train`'s function, then preprocesses the whole file with each worker count. The time excludes
importing megatron-core but includes starting the worker processes. The last line printed is JSON.

    python benchmarks/preprocess_speed.py [--documents 20000] [--vocab-size 8000] [--workers 1 2]
"""
import argparse
import importlib
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from megacpt.data.preprocess_command import preprocess, tokenizer_config
from megacpt.data.sentencepiece_training import train_sentencepiece

DOC_MODULES = ("argparse", "collections", "json", "os", "pathlib", "re", "shutil", "subprocess", "threading", "logging",
               "unittest")


def stdlib_words() -> list[str]:
    """Every word of the docstrings of a few stdlib modules and their members, repeats kept."""
    words = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):  # some members hold a descriptor under __doc__
                words += re.findall(r"[A-Za-z]+(?:'[a-z]+)?", doc)
    return words


def write_corpus(path: Path, documents: int, seed: int) -> None:
    rng = random.Random(seed)
    words = stdlib_words()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(documents):
            sentences = (" ".join(rng.choices(words, k=rng.randint(6, 20))).capitalize() + "."
                         for _ in range(rng.randint(3, 12)))
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus = folder / "corpus.jsonl"
        write_corpus(corpus, args.documents, args.seed)
        head = folder / "head.jsonl"
        head.write_text("".join(corpus.open(encoding="utf-8").readlines()[:2000]), encoding="utf-8")
        start = time.monotonic()
        model = train_sentencepiece([str(head)], args.vocab_size, str(folder / "tok"))
        train_seconds = time.monotonic() - start
        config = tokenizer_config("sentencepiece", model)
        runs = {}
        for workers in args.workers:
            result = preprocess([str(corpus)], config, str(folder / f"out{workers}"), workers=workers, append_eod=True)
            print(result.summary(), file=sys.stderr)
            runs[str(workers)] = {"tokens_per_s": round(result.tokens_per_s), "seconds": round(result.seconds, 2)}
        report = {
            "documents": result.documents,
            "tokens": result.tokens,
            "megabytes": round(corpus.stat().st_size / 1e6, 1),
            "vocab_size": args.vocab_size,
            "tokenizer_train_seconds": round(train_seconds, 2),
            "cpus": os.cpu_count(),
            "workers": runs,
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
