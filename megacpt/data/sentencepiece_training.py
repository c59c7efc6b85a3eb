"""Training SentencePiece BPE models the same way every time: `megacpt tokenizer train` and vocab extension.

The settings are fixed so that the same inputs give the same model: one thread, no input shuffling, at most
the first MAX_SENTENCES lines. The model has unk = 0 and eos = 1 (the EOD that preprocessing appends), no pad
or bos, and byte fallback, so every text encodes without unk. Documents are split into lines for training:
SentencePiece treats each input as one sentence and skips those longer than its max_sentence_length.

SentencePiece's default normalisation (nmt_nfkc, extra whitespace removed, a space prefixed to each text) is
right for prose but flattens code: newlines become spaces and indentation collapses. KEEP_WHITESPACE is the
alternative for code: text is kept as it is, so newlines (byte pieces) and runs of spaces (their own pieces)
survive an encode/decode round trip, and documents concatenate without an invented leading space.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece

from megacpt.data.documents import iter_documents
from megacpt.data.output_files import atomic_outputs
from megacpt.errors import UserError

MAX_SENTENCES = 1_000_000  # SentencePiece holds every training line in memory
KEEP_WHITESPACE = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False,
                   "add_dummy_prefix": False, "allow_whitespace_only_pieces": True}


def train_sentencepiece(inputs: Sequence[str], vocab_size: int, output_prefix: str, *, json_key: str = "text",
                        overwrite: bool = False, keep_whitespace: bool = False) -> str:
    """Train OUTPUT_PREFIX.model/.vocab on the lines of the documents in `inputs`; returns the .model path.
    `keep_whitespace` trains with KEEP_WHITESPACE (for code) instead of SentencePiece's default normalisation."""
    settings = KEEP_WHITESPACE if keep_whitespace else {}
    with atomic_outputs(output_prefix, (".vocab", ".model"), overwrite, inputs) as temp_prefix:
        write_model(sentencepiece_proto(inputs, vocab_size, json_key=json_key, **settings), temp_prefix)
    return output_prefix + ".model"


def sentencepiece_proto(inputs: Sequence[str], vocab_size: int, *, json_key: str = "text", **settings) -> bytes:
    """The serialized model `megacpt tokenizer train` trains on `inputs`; `settings` override trainer options
    (vocab extension passes the base model's normalization and a soft vocabulary limit)."""
    lines = _TrainingLines(iter_documents(inputs, json_key))
    model = io.BytesIO()  # not model_prefix: SentencePiece would record a file name in the model
    try:
        sentencepiece.SentencePieceTrainer.train(**{
            "sentence_iterator": iter(lines),
            "model_writer": model,
            "vocab_size": vocab_size,
            "model_type": "bpe",
            "unk_id": 0,
            "eos_id": 1,
            "bos_id": -1,
            "pad_id": -1,
            "byte_fallback": True,
            "num_threads": 1,
            "input_sentence_size": MAX_SENTENCES,
            "shuffle_input_sentence": False,
            "minloglevel": 1,
            **settings,
        })
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
    return model.getvalue()


def write_model(proto: bytes, prefix: str) -> None:
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
