"""`megacpt tokenizer train`: a SentencePiece BPE model from jsonl/txt documents, the same model every time.

The settings are fixed so that the same inputs give the same model: one thread, no input shuffling, at most
the first MAX_SENTENCES lines. The model has unk = 0 and eos = 1 (the EOD that preprocessing appends), no pad
or bos, and byte fallback, so every text encodes without unk. Documents are split into lines for training:
SentencePiece treats each input as one sentence and skips those longer than its max_sentence_length.
"""
from __future__ import annotations

import argparse
import io
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece

from megacpt.data.documents import iter_documents
from megacpt.data.output_files import atomic_outputs
from megacpt.errors import UserError

MAX_SENTENCES = 1_000_000  # SentencePiece holds every training line in memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train a SentencePiece BPE model (PREFIX.model, PREFIX.vocab)",
                               description="Train a SentencePiece BPE model from jsonl/txt documents.")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE",
                       help="documents: .jsonl, .jsonl.gz, .jsonl.zst (one JSON object per line) or .txt (one document "
                            "per file)")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="pieces in the model, including 256 byte pieces, unk and eos")
    train.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--json-key", default="text", metavar="KEY",
                       help="key of the document text in each jsonl line (default: text)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model/.vocab")


def run(args: argparse.Namespace) -> int:
    model = train_sentencepiece(args.input, args.vocab_size, args.output, json_key=args.json_key,
                                overwrite=args.overwrite)
    print(f"tokenizer: wrote {model} and {args.output}.vocab ({args.vocab_size} pieces, EOD id 1)")
    return 0


def train_sentencepiece(inputs: Sequence[str], vocab_size: int, output_prefix: str, *, json_key: str = "text",
                        overwrite: bool = False) -> str:
    """Train OUTPUT_PREFIX.model/.vocab on the lines of the documents in `inputs`; returns the .model path."""
    lines = _TrainingLines(iter_documents(inputs, json_key))
    with atomic_outputs(output_prefix, (".vocab", ".model"), overwrite) as temp_prefix:
        model = io.BytesIO()  # not model_prefix: SentencePiece would record the temporary name in the model
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=model,
                vocab_size=vocab_size,
                model_type="bpe",
                unk_id=0,
                eos_id=1,
                bos_id=-1,
                pad_id=-1,
                byte_fallback=True,
                num_threads=1,
                input_sentence_size=MAX_SENTENCES,
                shuffle_input_sentence=False,
                minloglevel=1,
            )
            failure = None
        except RuntimeError as e:
            failure = e
        if lines.error is not None:
            raise lines.error
        if failure is not None:
            inputs_text = ", ".join(map(str, inputs))
            if lines.count == 0:
                raise UserError(f"no text to train a tokenizer on in {inputs_text}")
            reason = str(failure).rsplit("] ", 1)[-1]  # drop SentencePiece's source location
            raise UserError(f"cannot train a {vocab_size}-piece tokenizer on {inputs_text}: {reason}")
        _write_model(model.getvalue(), temp_prefix)
    return output_prefix + ".model"


def _write_model(proto: bytes, prefix: str) -> None:
    """PREFIX.model, and PREFIX.vocab in SentencePiece's own format (piece TAB score) for people to read."""
    with open(prefix + ".model", "wb") as f:
        f.write(proto)
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    with open(prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(processor.get_piece_size()):
            f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")


class _TrainingLines:
    """The non-blank lines of the documents, counted so that an empty input gets its own message.

    A UserError from the reader is kept, not raised: through SentencePiece's C++ it would arrive as a
    RuntimeError, so the trainer sees the input end and the caller raises the error afterwards.
    """

    def __init__(self, documents: Iterable[str]):
        self.documents = documents
        self.count = 0
        self.error: UserError | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for document in self.documents:
                for line in document.splitlines():
                    if line.strip():
                        self.count += 1
                        yield line
        except UserError as e:
            self.error = e
