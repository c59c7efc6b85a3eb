"""Text to token ids: one small interface over SentencePiece, Hugging Face `tokenizers` and raw bytes.

`build_tokenizer(config)` is the only constructor other modules need. Every tokenizer has an end-of-document
id (`eod_id`), because preprocessing separates documents with it; a model file without one is a user error,
not something to guess. This module only wraps the libraries: it trains nothing (see sentencepiece_training.py)
and imports neither torch nor megatron, so preprocessing workers start fast.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import sentencepiece

from megacpt.config import TokenizerConfig
from megacpt.errors import ConfigError

# Pythia / GPT-NeoX-20B's end-of-document token: the EOD of an HF tokenizer that declares no eos_token.
HF_EOD_TOKEN = "<|endoftext|>"


class Tokenizer(ABC):
    """What preprocessing, generation and evaluation need from a tokenizer."""

    name: str
    vocab_size: int
    eod_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added (EOD is appended by the caller)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs: type, source file, vocabulary size and EOD."""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model`; EOD is the model's eos piece (`megacpt tokenizer train` always defines one)."""

    name = "sentencepiece"

    def __init__(self, model_path: str):
        self.path = _existing_file(model_path, "tokenizer.model")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise ConfigError("tokenizer.model", f"cannot load SentencePiece model {self.path}: {e}") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod_id = self._sp.eos_id()
        if self.eod_id < 0:
            raise ConfigError("tokenizer.model",
                              f"SentencePiece model {self.path} has no eos piece, which is the end-of-document token; "
                              "train it with eos_id set")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def describe(self) -> str:
        eod_piece = self._sp.id_to_piece(self.eod_id)
        return f"sentencepiece {self.path}: vocab {self.vocab_size}, EOD {self.eod_id} ({eod_piece})"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (Pythia, Llama 3, Qwen2, ...), read with the `tokenizers` library.

    EOD is the `eos_token` of the `tokenizer_config.json` next to the file (Llama 3: `<|end_of_text|>`, Qwen2:
    `<|endoftext|>`), else `<|endoftext|>` when the vocabulary has it: tokenizer.json itself does not say which
    token ends a document.
    """

    name = "hf"

    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError:
            raise ConfigError("tokenizer.type",
                              "'hf' needs the 'tokenizers' package (pip install megacpt[hf])") from None

        file = Path(path)
        self.path = _existing_file(file / "tokenizer.json" if file.is_dir() else file, "tokenizer.path")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust bindings raise plain Exception for unreadable or malformed files
            raise ConfigError("tokenizer.path", f"cannot load Hugging Face tokenizer {self.path}: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_file = self.path.parent / "tokenizer_config.json"
        self.eod_token = self._declared_eos(config_file)
        if self.eod_token is None and self._tok.token_to_id(HF_EOD_TOKEN) is not None:
            self.eod_token = HF_EOD_TOKEN
        if self.eod_token is None:
            raise ConfigError("tokenizer.path", f"{self.path} has no {HF_EOD_TOKEN} token and no usable eos_token "
                                                f"in {config_file}; one of them is needed as the end-of-document "
                                                "token")
        self.eod_id = self._tok.token_to_id(self.eod_token)

    def _declared_eos(self, config_file: Path) -> str | None:
        """The eos_token tokenizer_config.json declares, if it is in the vocabulary."""
        if not config_file.is_file():
            return None
        try:
            eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError("tokenizer.path", f"cannot read {config_file} for the eos token: {e}") from None
        if isinstance(eos, dict):  # older files store an AddedToken as a dict
            eos = eos.get("content")
        return eos if isinstance(eos, str) and self._tok.token_to_id(eos) is not None else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def describe(self) -> str:
        return f"hf {self.path}: vocab {self.vocab_size}, EOD {self.eod_id} ({self.eod_token})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 and EOD 256: no file, no training, every text round-trips."""

    name = "byte"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """EOD decodes to nothing (as SentencePiece's control pieces do); a cut multi-byte character to U+FFFD."""
        return bytes(i for i in ids if i != self.eod_id).decode("utf-8", errors="replace")

    def describe(self) -> str:
        return f"byte: vocab {self.vocab_size}, EOD {self.eod_id}"


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """The tokenizer a config section describes; raises a ConfigError naming the key when its file is bad."""
    if config.type == "sentencepiece":
        return SentencePieceTokenizer(config.model)
    if config.type == "hf":
        return HFTokenizer(config.path)
    return ByteTokenizer()


def _existing_file(path: str | Path, key: str) -> Path:
    file = Path(path)
    if not file.is_file():
        problem = "is a directory" if file.is_dir() else "does not exist"
        raise ConfigError(key, f"tokenizer file {file} {problem}")
    return file


def eod_id(config: TokenizerConfig | None) -> int | None:
    """The end-of-document id of the configured tokenizer, or None for pre-tokenized data without one."""
    return None if config is None else build_tokenizer(config).eod_id


def check_vocabulary(config: TokenizerConfig | None, vocab_size: int) -> None:
    """Every id the tokenizer can produce must have an embedding row: refuse a vocabulary larger than the model's."""
    if config is None:
        return
    tokenizer = build_tokenizer(config)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError("model.vocab_size", f"is {vocab_size}, but the tokenizer ({tokenizer.describe()}) has "
                                              f"{tokenizer.vocab_size} ids; set model.vocab_size to at least "
                                              f"{tokenizer.vocab_size} (it is padded to a multiple of 128 anyway)")
