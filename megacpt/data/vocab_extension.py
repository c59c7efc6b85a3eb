"""Vocabulary extension: a SentencePiece BPE model with pieces of a new corpus appended, old ids untouched.

A model trained on English splits another language or code into many short pieces. `extend_tokenizer` trains
a BPE model on the new corpus with the base model's settings, and appends to the base's ModelProto (the
`sentencepiece` package's own protobuf, never parsed by hand) the pieces of that model the base lacks, in
the new model's merge order, up to N of them. Ids 0..V-1 keep their piece, type and score, so a checkpoint
trained with the base tokenizer reads them as before; `megacpt extend-vocab` then grows its embedding.

Why a prefix of the merge order. SentencePiece's BPE encoder starts from characters and repeatedly joins
the adjacent pair whose concatenation is a piece with the highest score; a piece can only come out of the
encoder if it is the join of two symbols the encoder can already form. The new model's pieces are sorted by
score, which is its merge order: each merged piece joins two pieces merged before it (or single
characters). Taking a prefix of that order, with each character the base lacks appended before the first
piece that holds it, therefore guarantees that both parts of every appended piece are in the base or
appended before it: every appended piece is reachable, and the BPE merges that Hugging Face's converter
derives from the pieces (each piece from two shorter pieces) reproduce SentencePiece's encoding. Appended
pieces get scores below every base score, in the new model's order: the base's merges keep their priority,
and among the new ones the new model's order holds.

Hugging Face BPE tokenizer.json bases are extended by bpe_extension.py (their merges and added tokens need a
different edit).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from megacpt.data.documents import iter_documents
from megacpt.data.output_files import atomic_outputs
from megacpt.data.sentencepiece_training import sentencepiece_proto, write_model
from megacpt.errors import UserError

ModelProto = sentencepiece_model_pb2.ModelProto
NORMAL = ModelProto.SentencePiece.NORMAL
# Settings of the base a new-corpus model must share for its pieces to mean the same in the base.
_NORMALIZER_SETTINGS = {"normalization_rule_name": "name", "add_dummy_prefix": "add_dummy_prefix",
                        "remove_extra_whitespaces": "remove_extra_whitespaces"}
_TRAINER_SETTINGS = ("split_by_whitespace", "split_digits", "treat_whitespace_as_suffix",
                     "allow_whitespace_only_pieces", "max_sentencepiece_length", "split_by_unicode_script",
                     "split_by_number")


@dataclass
class Extension:
    """What `extend_tokenizer` wrote and measured."""

    model: str
    base_size: int
    added: int
    tokens_per_byte_before: float
    tokens_per_byte_after: float


def extend_tokenizer(base: str, inputs: Sequence[str], add: int, output_prefix: str, *, json_key: str = "text",
                     overwrite: bool = False) -> Extension:
    """Write OUTPUT_PREFIX.model/.vocab: `base` with up to `add` pieces of a BPE model trained on `inputs`."""
    if add <= 0:
        raise UserError(f"--add {add}: the number of pieces to add must be at least 1")
    base_proto = read_base(base)
    iter_documents(inputs, json_key)  # checks every input file before anything is trained or written
    with atomic_outputs(output_prefix, (".vocab", ".model"), overwrite, [base, *inputs]) as temp_prefix:
        new_corpus = ModelProto.FromString(sentencepiece_proto(
            inputs, len(base_proto.pieces) + add, json_key=json_key, hard_vocab_limit=False, minloglevel=2,
            **corpus_model_settings(base_proto)))
        extended = append_pieces(base_proto, new_pieces(new_corpus), add)
        write_model(extended.SerializeToString(), temp_prefix)
    before = tokens_per_byte(base_proto, inputs, json_key)
    after = tokens_per_byte(extended, inputs, json_key)
    return Extension(output_prefix + ".model", len(base_proto.pieces), len(extended.pieces) - len(base_proto.pieces),
                     before, after)


def read_base(path: str) -> ModelProto:
    """The base model's proto, or a UserError naming the file when it is not a SentencePiece BPE model."""
    proto = read_sentencepiece(path, "--base")
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise UserError(f"--base {path} is a SentencePiece {kind} model; only BPE models are extended")
    return proto


def corpus_model_settings(base: ModelProto) -> dict:
    """Trainer options that make the new-corpus model normalize and split text as the base does."""
    settings = {option: getattr(base.normalizer_spec, field) for option, field in _NORMALIZER_SETTINGS.items()}
    settings.update({option: getattr(base.trainer_spec, option) for option in _TRAINER_SETTINGS})
    return settings


def new_pieces(model: ModelProto) -> list[str]:
    """The normal pieces of a BPE model in merge order (highest score first; ties keep the model's order)."""
    normal = [(i, p) for i, p in enumerate(model.pieces) if p.type == NORMAL]
    return [p.piece for _, p in sorted(normal, key=lambda item: (-item[1].score, item[0]))]


def append_pieces(base: ModelProto, candidates: Sequence[str], add: int) -> ModelProto:
    """`base` with the candidates it lacks appended in order, each after those of its characters the base lacks,
    up to `add` pieces in all; scored below every base score, in order."""
    out = ModelProto()
    out.CopyFrom(base)
    known = {p.piece for p in base.pieces}
    score = min(p.score for p in base.pieces)
    for piece in candidates:
        missing = list(dict.fromkeys(c for c in piece if c not in known))
        missing += [piece] if piece not in known and piece not in missing else []
        if len(out.pieces) - len(base.pieces) + len(missing) > add:
            break
        for new in missing:
            known.add(new)
            score -= 1.0
            out.pieces.add(piece=new, score=score, type=NORMAL)
    out.trainer_spec.vocab_size = len(out.pieces)
    return out


def tokens_per_byte(model: ModelProto, inputs: Sequence[str], json_key: str) -> float:
    """Tokens of the documents under `model` per UTF-8 byte of their text."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
    tokens = size = 0
    for document in iter_documents(inputs, json_key):
        tokens += len(processor.encode(document))
        size += len(document.encode("utf-8"))
    return tokens / max(size, 1)


def read_sentencepiece(path: str | Path, what: str) -> ModelProto:
    """A SentencePiece model file's proto; a UserError naming `what` and the file when it is not one."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} {file} {'is a directory' if file.is_dir() else 'does not exist'}")
    try:
        proto = ModelProto.FromString(file.read_bytes())
        sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except Exception as e:  # protobuf's DecodeError, SentencePiece's RuntimeError, OSError
        raise UserError(f"{what} {file} is not a SentencePiece model: {e}") from None
    if not proto.pieces:
        raise UserError(f"{what} {file} is not a SentencePiece model: it has no pieces")
    return proto


def check_extends(base: ModelProto, extended: ModelProto, extended_file: str | Path) -> None:
    """`extended` must hold every piece of `base` at the same id, and more pieces."""
    for i, (old, new) in enumerate(zip(base.pieces, extended.pieces)):
        if (old.piece, old.type) != (new.piece, new.type):
            raise UserError(f"--tokenizer {extended_file} does not extend the checkpoint's tokenizer: id {i} is "
                            f"{new.piece!r}, the checkpoint's tokenizer has {old.piece!r} (the first "
                            f"{len(base.pieces)} pieces must be the same)")
    if len(extended.pieces) <= len(base.pieces):
        raise UserError(f"--tokenizer {extended_file} has {len(extended.pieces)} pieces, no more than the "
                        f"checkpoint's tokenizer ({len(base.pieces)}); there is nothing to add")


def base_splits(base: ModelProto, pieces: Sequence[str]) -> list[list[int]]:
    """The base model's ids for the text of each piece, as the base encodes it inside a text.

    Pieces are already normalized (spaces are "▁"), so the base encodes them with its normalization switched
    off and no dummy "▁" prefix: a piece "▁return" splits into the base's pieces of " return" exactly, and a
    character the base lacks into its byte pieces.
    """
    plain = ModelProto()
    plain.CopyFrom(base)
    plain.normalizer_spec.name = "identity"
    plain.normalizer_spec.precompiled_charsmap = b""
    plain.normalizer_spec.add_dummy_prefix = False
    plain.normalizer_spec.remove_extra_whitespaces = False
    processor = sentencepiece.SentencePieceProcessor(model_proto=plain.SerializeToString())
    return [processor.encode(piece) for piece in pieces]
