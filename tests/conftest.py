"""Shared fixtures: a small corpus and the tiny tokenizers trained on it (each built once per test session)."""
import json
import random

import pytest

WORDS = ("model data token train loss step batch layer rotary replay stage warmup cosine decay "
         "the of and to in is for with on as über café naïve").split()


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """400 pseudo-sentences over a small vocabulary, some with non-ASCII characters."""
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(400)]


def _write_jsonl(path, texts, key: str = "text") -> str:
    path.write_text("".join(json.dumps({key: text}) + "\n" for text in texts), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def write_jsonl():
    """write_jsonl(path, texts, key="text") -> str(path): one {key: text} object per line."""
    return _write_jsonl


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, corpus) -> str:
    """A 300-piece SentencePiece BPE model trained with `megacpt tokenizer train`'s own function."""
    from megacpt.data.sentencepiece_training import train_sentencepiece

    folder = tmp_path_factory.mktemp("sp")
    return train_sentencepiece([_write_jsonl(folder / "corpus.jsonl", corpus)], 300, str(folder / "tok"))


@pytest.fixture(scope="session")
def make_hf_tokenizer(corpus):
    """make_hf_tokenizer(path, special_tokens) saves a tiny byte-level BPE tokenizer.json built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def make(path, special_tokens: list[str]) -> str:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special_tokens, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(corpus, trainer)
        tokenizer.save(str(path))
        return str(path)

    return make


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory, make_hf_tokenizer) -> str:
    """A tiny tokenizer.json with Pythia's end-of-document token <|endoftext|>."""
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tokenizer.json", ["<|endoftext|>"])


@pytest.fixture(scope="session")
def pattern_data(tmp_path_factory) -> dict:
    """Indexed datasets for training tests: learnable patterns and random tokens (vocab 256), and held-out files."""
    from datagen import pattern_documents, random_documents, write_indexed

    folder = tmp_path_factory.mktemp("data")
    return {
        "a": write_indexed(folder / "a", pattern_documents(11, 3, 120, 100)),
        "b": write_indexed(folder / "b", pattern_documents(5, 100, 120, 100)),
        "c": write_indexed(folder / "c", pattern_documents(17, 50, 120, 100)),
        "noise": write_indexed(folder / "noise", random_documents(0, 120, 100)),
        # held-out files of the same patterns, for validation sets (a training prefix as validation is refused)
        "a_val": write_indexed(folder / "a_val", pattern_documents(11, 3, 30, 100)),
        "b_val": write_indexed(folder / "b_val", pattern_documents(5, 100, 30, 100)),
        "noise_val": write_indexed(folder / "noise_val", random_documents(1, 30, 100)),
    }


@pytest.fixture(scope="session")
def world():
    """A world of one in this process (gloo), for tests that build datasets or models in-process."""
    from megacpt.runtime.distributed import setup_world

    return setup_world(1, 0)
