"""Vocabulary extension of a Hugging Face BPE `tokenizer.json` (Llama 3, Qwen2, GPT-NeoX): tokens of a new
corpus appended, every old id untouched.

A BPE tokenizer.json holds a vocabulary (token -> id), an ordered list of merges (pairs of tokens; earlier
merges win) and added tokens (Llama 3's 256 special tokens at ids 128,000-128,255). `extend_bpe` trains a BPE
model on the new corpus with the base's normalizer and pre-tokenizer (the `tokenizers` library's own trainer)
and appends, in that model's merge order, each merge whose two parts the base (or an earlier appended merge)
already has and whose result it lacks: the result gets the next free id, after the added tokens, and its
merge goes after every base merge, so the base's merges keep their priority. Every appended token is thus the
join of two tokens the extended model can form. Added tokens are also put into the vocabulary at their ids
(the library would otherwise renumber them after the grown vocabulary), and the written file is read back
with the library to check that every old token kept its id. The base's files are edited as JSON, never re-serialised by
the library, so nothing else of the tokenizer changes.

What this module does not do: extend WordPiece/Unigram tokenizer.json files, or SentencePiece models
(vocab_extension.py does those).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from megacpt.data.documents import iter_documents
from megacpt.errors import UserError


def read_bpe(path: str | Path, what: str) -> dict:
    """The JSON of a BPE tokenizer.json; a UserError naming `what` and the file when it is not one."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} {file} {'is a directory' if file.is_dir() else 'does not exist'}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        model = data["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{what} {file} is not a Hugging Face tokenizer.json: {e}") from None
    if model.get("type") != "BPE":
        raise UserError(f"{what} {file} is a {model.get('type')} tokenizer.json; only BPE ones are extended")
    return data


def vocabulary(data: dict) -> dict[str, int]:
    """Every token of a tokenizer.json with its id: the model's vocabulary and the added tokens."""
    return {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}


def _pair(merge) -> tuple[str, str]:
    """A merge as a pair (tokenizers writes "a b" strings or, since 0.20, [a, b] lists)."""
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)


def extend_bpe(base: str, inputs: Sequence[str], add: int, output: str, *, json_key: str = "text",
               overwrite: bool = False) -> tuple[int, int]:
    """Write OUTPUT (a tokenizer.json, with the base's companion files next to it): `base` with up to `add`
    tokens of a BPE trained on `inputs`. Returns (base size, tokens added)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if add <= 0:
        raise UserError(f"--add {add}: the number of tokens to add must be at least 1")
    data = read_bpe(base, "--base")
    out = Path(output)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another path or pass --overwrite")
    documents = list(iter_documents(inputs, json_key))
    known = vocabulary(data)
    trainer_model = Tokenizer.from_str(json.dumps(data))
    trainer_model.model = models.BPE()
    trainer = trainers.BpeTrainer(vocab_size=len(known) + add, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer_model.train_from_iterator(documents, trainer)
    learned = json.loads(trainer_model.to_str())["model"]["merges"]
    string_form = any(isinstance(m, str) for m in data["model"]["merges"])
    # tokenizers gives an added token that the model's vocabulary lacks the id len(vocabulary) + k when it loads
    # the file, whatever id the file says: with tokens appended to the vocabulary, Llama 3's specials would move.
    # In the vocabulary at their own ids they keep them (no merge produces them; they are matched before BPE).
    for token in data.get("added_tokens", []):
        data["model"]["vocab"].setdefault(token["content"], token["id"])
    next_id = max(known.values()) + 1
    added = 0
    for left, right in map(_pair, learned):
        token = left + right
        if added == add or token in known or left not in known or right not in known:
            continue
        data["model"]["vocab"][token] = known[token] = next_id
        data["model"]["merges"].append(f"{left} {right}" if string_form else [left, right])
        next_id += 1
        added += 1
    base_size = len(known) - added
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.partial")
    temp.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    written = Tokenizer.from_file(str(temp))  # the library reads what was written, every id where it was put
    moved = [token for token, i in known.items() if written.token_to_id(token) != i]
    if moved:
        temp.unlink()
        raise UserError(f"--base {base}: the extended tokenizer would give {moved[0]!r} another id; nothing written")
    temp.replace(out)
    for companion in ("tokenizer_config.json", "special_tokens_map.json"):
        source = Path(base).parent / companion
        if source.is_file() and source.resolve() != (out.parent / companion).resolve():
            (out.parent / companion).write_bytes(source.read_bytes())
    return base_size, added


def bpe_tokens_per_byte(file: str | Path, inputs: Sequence[str], json_key: str) -> float:
    """Tokens of the documents under the tokenizer.json per UTF-8 byte of their text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(file))
    tokens = size = 0
    for document in iter_documents(inputs, json_key):
        tokens += len(tokenizer.encode(document, add_special_tokens=False).ids)
        size += len(document.encode("utf-8"))
    return tokens / max(size, 1)


def check_bpe_extends(base: dict, extended: dict, extended_file: str | Path) -> None:
    """`extended` must give every token of `base` the same id, and have more tokens."""
    old, new = vocabulary(base), vocabulary(extended)
    for token, i in old.items():
        if new.get(token) != i:
            raise UserError(f"--tokenizer {extended_file} does not extend the checkpoint's tokenizer: token "
                            f"{token!r} has id {new.get(token)} there and {i} in the checkpoint's tokenizer (every "
                            f"one of its {len(old)} tokens must keep its id)")
    if len(new) <= len(old):
        raise UserError(f"--tokenizer {extended_file} has {len(new)} tokens, no more than the checkpoint's "
                        f"tokenizer ({len(old)}); there is nothing to add")


def bpe_base_splits(base_file: str | Path, extended_file: str | Path, first_new: int, count: int) -> list[list[int]]:
    """For each new id first_new .. first_new+count-1: the base tokenizer's ids of the text it stands for."""
    from tokenizers import Tokenizer

    base, extended = Tokenizer.from_file(str(base_file)), Tokenizer.from_file(str(extended_file))
    return [base.encode(extended.decode([i], skip_special_tokens=False), add_special_tokens=False).ids
            for i in range(first_new, first_new + count)]
