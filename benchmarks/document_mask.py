"""What document masking costs per training step: forward + backward of the demo model at 4x the demo's
length (512 tokens), with the block-diagonal mask of `data.document_mask` against plain causal attention.

    python benchmarks/document_mask.py --steps 20                 # CPU, fp32, the demo model at 512
    python benchmarks/document_mask.py --seq 2048 --preset cpu-25m --micro-batch 2

Both arms run the same model on the same random tokens, alternating step by step (the order flipping every
pair), so the machine's load of the moment hits both alike. The masked arm's documents have random lengths
(exponential, mean --mean-doc tokens); its time includes building the mask from the document numbers, as
the training step does. Prints one line per pair and, on the last line, JSON with both arms' median step
times and the median of the per-pair ratios (masked / causal).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def document_ids(batch: int, seq: int, mean_doc: float, generator: torch.Generator) -> torch.Tensor:
    """Per-token document numbers of `batch` packed samples with exponentially distributed document lengths."""
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(max(1, int(torch.empty(1).exponential_(1 / mean_doc, generator=generator).item())))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq])
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="'demo' (4 x 192, vocab 2048) or a megacpt preset")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--mean-doc", type=float, default=128.0, help="mean document length in tokens")
    parser.add_argument("--steps", type=int, default=20, help="pairs of steps (after 2 warm-up pairs)")
    args = parser.parse_args()

    from megacpt.config import ModelConfig, padded_vocab_size
    from megacpt.model.gpt import build_gpt
    from megacpt.runtime.distributed import setup_world
    from megacpt.train.validation import token_losses

    world = setup_world(1, seed=0)
    dims = dict(num_layers=4, hidden_size=192, num_attention_heads=6, vocab_size=2048) if args.preset == "demo" \
        else dict(preset=args.preset)
    model_cfg = ModelConfig(**dims, seq_length=args.seq)
    model = build_gpt(model_cfg, padded_vocab_size(model_cfg.vocab_size, 1)).to(world.device).train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (args.micro_batch, args.seq + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(args.micro_batch, args.seq),
             "position_ids": torch.arange(args.seq).expand(args.micro_batch, -1)}
    masked = {**batch, "document_ids": document_ids(args.micro_batch, args.seq, args.mean_doc, g)}
    arms = {"causal": {k: v.to(world.device) for k, v in batch.items()},
            "masked": {k: v.to(world.device) for k, v in masked.items()}}

    def step(mb) -> float:
        start = time.perf_counter()
        total, count = token_losses(model, mb)
        (total / count).backward()
        model.zero_grad(set_to_none=True)
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {"causal": [], "masked": []}
    for i in range(args.steps + 2):
        order = ("causal", "masked") if i % 2 == 0 else ("masked", "causal")
        pair = {name: step(arms[name]) for name in order}
        if i >= 2:
            for name, t in pair.items():
                times[name].append(t)
            print(f"pair {i - 1}: causal {pair['causal'] * 1e3:.1f} ms, masked {pair['masked'] * 1e3:.1f} ms")
    docs = (arms["masked"]["document_ids"].max(dim=1).values + 1).float().mean().item()
    print(json.dumps({
        "device": str(world.device), "preset": args.preset, "seq": args.seq, "micro_batch": args.micro_batch,
        "documents_per_sample": round(docs, 1), "torch": torch.__version__,
        "causal_ms": round(statistics.median(times["causal"]) * 1e3, 1),
        "masked_ms": round(statistics.median(times["masked"]) * 1e3, 1),
        "paired_ratio": round(statistics.median(m / c for m, c in zip(times["masked"], times["causal"])), 3),
    }))


if __name__ == "__main__":
    main()
