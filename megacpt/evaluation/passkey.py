"""Synthetic passkey retrieval: does a model use a number it read far back in its context?

A prompt of `length` tokens is filler text (the same few sentences over and over) with one sentence that
states a random five-digit pass key placed at a chosen depth (0: right after the introduction, 1: right
before the question), and ends with the question and, teacher-forced, the key again. One forward pass gives
both scores of a trial:

- **answer loss**: the mean next-token loss of the key's tokens after the question (nats per token), next to
  the same loss in the same prompt without the key sentence (the control: what guessing costs);
- **retrieved**: whether greedy decoding after the question would write the key. Greedy decoding writes it
  exactly when the argmax at every answer position is the answer's next token given the earlier ones, which
  the teacher-forced pass shows, so no decoding loop is needed.

Prompts are built in token space (every piece encoded once, joined as ids), so the key's tokens are the same
where it is stated and where it is asked for. The model is any callable `(ids [1, n], positions [1, n]) ->
logits [1, n, vocab]`; this module knows nothing of checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INTRO = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and remember it."
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = (" The pass key is", "{key}", ". Remember it.", "{key}", " is the pass key.")
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    ids: list[int]         # the whole prompt, the answer included
    answer: slice          # where the answer's tokens are in `ids`
    key_at: int | None     # index of the key sentence's first token, None for the control


def build_prompt(encode, length: int, depth: float, key: str, with_key: bool = True) -> PasskeyPrompt:
    """A prompt of at most `length` tokens, filler in whole sentences, with the key sentence after a `depth`
    share of them (`with_key` False: no key sentence, more filler; the control)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth {depth} must lie in [0, 1]")
    intro, filler, question, answer = encode(INTRO), encode(FILLER), encode(QUESTION), encode(" " + key)
    stated = [t for piece in KEY_SENTENCE for t in (answer if piece == "{key}" else encode(piece))] if with_key else []
    fillers = (length - len(intro) - len(stated) - len(question) - len(answer)) // len(filler)
    if fillers < 1:
        raise ValueError(f"a prompt of {length} tokens has no room for filler; give a longer length")
    head = round(depth * fillers)
    ids = intro + filler * head
    key_at = len(ids) if with_key else None
    ids = ids + stated + filler * (fillers - head) + question
    return PasskeyPrompt(ids + answer, slice(len(ids), len(ids) + len(answer)), key_at)


@torch.no_grad()
def score(model, prompt: PasskeyPrompt, device: torch.device) -> tuple[float, bool]:
    """(mean loss of the answer tokens, whether greedy decoding writes the answer)."""
    ids = torch.tensor([prompt.ids], device=device)
    logits = model(ids, torch.arange(ids.shape[1], device=device)[None]).float()[0]
    predicting = logits[prompt.answer.start - 1:prompt.answer.stop - 1]  # position t predicts token t + 1
    target = ids[0, prompt.answer]
    loss = torch.nn.functional.cross_entropy(predicting, target).item()
    return loss, bool((predicting.argmax(-1) == target).all())


def passkey_table(model, encode, length: int, depths: list[float], trials: int, seed: int,
                  device: torch.device) -> list[dict]:
    """Per depth: the share of trials retrieved, the answer loss with the key and without it (the control)."""
    rng = np.random.default_rng(seed)
    keys = [str(k) for k in rng.integers(10000, 100000, trials)]
    control = [score(model, build_prompt(encode, length, 0.0, key, with_key=False), device)[0] for key in keys]
    rows = []
    for depth in depths:
        results = [score(model, build_prompt(encode, length, depth, key), device) for key in keys]
        rows.append({"depth": depth, "retrieved": sum(ok for _, ok in results) / trials,
                     "answer_loss": float(np.mean([loss for loss, _ in results])),
                     "answer_loss_without_key": float(np.mean(control))})
    return rows
