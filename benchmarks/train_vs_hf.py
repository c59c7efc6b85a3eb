"""Training throughput: megacpt (megatron-core model in a DeepSpeed engine, one process) against Hugging Face
`GPTNeoXForCausalLM` (SDPA attention) with a plain PyTorch AdamW loop. Same dims, batch, sequence, AdamW,
fp32, same random tokens; the two alternate in one run so machine load hits both alike.

    python benchmarks/train_vs_hf.py --size demo --reps 5
    python benchmarks/train_vs_hf.py --size 25m --reps 5

Prints one line per repetition and, on the last line, JSON with the median tokens/s of each and the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SIZES = {
    # the demo model and a ~25M-parameter model at sequence 512
    "demo": dict(num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=256, vocab_size=4096, batch=8),
    "25m": dict(num_layers=6, hidden_size=512, num_attention_heads=8, seq_length=512, vocab_size=8192, batch=4),
}


def megacpt_trainer(size: dict, activation_checkpointing: bool = False):
    from megacpt.config import ModelConfig, RunConfig, padded_vocab_size
    from megacpt.distributed import MegatronMPU, setup_world
    from megacpt.engine import deepspeed_config, initialize
    from megacpt.model.neox import build_gpt_neox
    from megacpt.schedule import StageScheduler

    setup_world(1, 0)
    model_cfg = ModelConfig(**{k: v for k, v in size.items() if k != "batch"})
    config = RunConfig.model_validate({
        "run_dir": "/tmp/megacpt-bench", "model": model_cfg.model_dump(),
        "data": {"sources": [{"name": "x", "prefix": "unused"}]},
        "schedule": {"style": "constant", "max_lr": 1e-4},
        "train": {"steps": 10**6, "global_batch_size": size["batch"], "micro_batch_size": size["batch"],
                  "activation_checkpointing": activation_checkpointing},
    })
    model = build_gpt_neox(config.model, padded_vocab_size(model_cfg.vocab_size, 1), 1,
                           activation_checkpointing=activation_checkpointing)
    ds = deepspeed_config(config, 1)
    engine, _, _ = initialize(model, ds, lambda opt: StageScheduler(opt, config.schedule, 10**6), MegatronMPU)
    positions = torch.arange(size["seq_length"]).unsqueeze(0).expand(size["batch"], -1)

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> float:
        loss = engine(tokens, positions, None, labels=labels).mean()
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def hf_trainer(size: dict):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=size["vocab_size"], hidden_size=size["hidden_size"],
                           num_hidden_layers=size["num_layers"], num_attention_heads=size["num_attention_heads"],
                           intermediate_size=4 * size["hidden_size"], max_position_embeddings=size["seq_length"],
                           rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
                           attn_implementation="sdpa")
    model = GPTNeoXForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> float:
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def tokens_per_s(step, size: dict, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, size["vocab_size"], (size["batch"], size["seq_length"] + 1), generator=gen)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    step(tokens, labels)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(tokens, labels)
    float(loss)
    return steps * size["batch"] * size["seq_length"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    args = parser.parse_args()
    size = SIZES[args.size]
    torch.manual_seed(0)
    ours, theirs = megacpt_trainer(size), hf_trainer(size)
    results = {"megacpt": [], "hf": []}
    for rep in range(args.reps):
        results["megacpt"].append(tokens_per_s(ours, size, args.steps))
        results["hf"].append(tokens_per_s(theirs, size, args.steps))
        print(f"rep {rep}: megacpt {results['megacpt'][-1]:,.0f} tok/s  hf {results['hf'][-1]:,.0f} tok/s", file=sys.stderr)
    median = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({"size": args.size, **size, "threads": torch.get_num_threads(), "reps": args.reps,
                      "megacpt_tokens_per_s": round(median["megacpt"]), "hf_tokens_per_s": round(median["hf"]),
                      "ratio": round(median["megacpt"] / median["hf"], 3), "all": results}))


if __name__ == "__main__":
    main()
