"""`megacpt generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3) --max-new-tokens N`: greedy decoding.

A quick look at what a checkpoint has learned, not a serving path: one full forward pass per new token (no
KV cache), argmax over the real vocabulary (padding rows never win), exactly N new tokens (no stop at EOD).
One process, or under the deepspeed launcher with tensor parallel = the world size (the logits are gathered
across ranks). Rank 0 prints the text when the checkpoint names a tokenizer, and always, on its last line,
the new token ids as a JSON list.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from megacpt.cli_helpers import positive_int
from megacpt.config import ModelConfig
from megacpt.errors import UserError
from megacpt.weights import checkpoint_io


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoints folder (its `latest`) or one tag folder")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="text, encoded with the checkpoint's tokenizer")
    prompt.add_argument("--prompt-ids", metavar="1,2,3", help="token ids, comma-separated")
    parser.add_argument("--max-new-tokens", required=True, type=positive_int, metavar="N",
                        help="tokens to generate")


def run(args: argparse.Namespace) -> int:
    from megacpt.runtime.distributed import setup_world

    source = checkpoint_io.load(args.checkpoint)
    model = source.model
    tokenizer = checkpoint_io.checkpoint_tokenizer(source.state)
    prompt = prompt_ids(args, tokenizer, model)
    tp = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's world, all of it tensor parallel
    checkpoint_io.check_tensor_parallel(model, tp)
    if source.padded_vocab_size % tp:
        raise UserError(f"the checkpoint's padded vocabulary {source.padded_vocab_size} does not split over {tp} "
                        "ranks; reshard it first")
    world = setup_world(tp, seed=0)
    gpt = checkpoint_io.build_model(model, source.weights, world.tensor_size, world.tensor_rank, world.device)
    new = greedy(gpt, prompt, args.max_new_tokens, model.vocab_size, world.device)
    if world.is_main:
        if tokenizer is not None:
            print(tokenizer.decode(prompt + new))
        print(json.dumps(new))
    return 0


def prompt_ids(args: argparse.Namespace, tokenizer, model: ModelConfig) -> list[int]:
    """The prompt as ids within the vocabulary, leaving room for the new tokens within seq_length."""
    if args.prompt is not None:
        if tokenizer is None:
            raise UserError("--prompt: the checkpoint names no tokenizer; give --prompt-ids instead")
        ids = tokenizer.encode(args.prompt)
    else:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",")]
        except ValueError:
            raise UserError(f"--prompt-ids expects comma-separated integers, got '{args.prompt_ids}'") from None
    if not ids:
        raise UserError("the prompt is empty; greedy decoding needs at least one token")
    bad = [i for i in ids if not 0 <= i < model.vocab_size]
    if bad:
        raise UserError(f"prompt ids {bad[:5]} are outside the model's vocabulary [0, {model.vocab_size})")
    if len(ids) + args.max_new_tokens > model.seq_length:
        raise UserError(f"{len(ids)} prompt + {args.max_new_tokens} new tokens exceed the model's seq_length "
                        f"{model.seq_length}")
    return ids


@torch.no_grad()
def greedy(model, prompt: list[int], max_new_tokens: int, vocab_size: int, device: torch.device) -> list[int]:
    """The argmax continuation: every step runs the whole sequence and appends the best real token."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ids = torch.tensor([prompt], device=device)
    for _ in range(max_new_tokens):
        positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
        last = model(ids, positions, None)[:, -1:].contiguous()  # [1, 1, padded vocab / tp]
        logits = gather_from_tensor_model_parallel_region(last)[0, 0, :vocab_size]
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()
