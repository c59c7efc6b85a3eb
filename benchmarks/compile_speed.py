"""`train.compile` against eager: megacpt's model in its DeepSpeed engine, compiled and not, in one process on the
same random tokens, alternating step by step (the order flipping every pair) after the compilation's warm-up.

    python benchmarks/compile_speed.py --size demo --steps 30

Prints one line per pair and, last, JSON with each side's tokens/s at its median step time, their ratio and the
median of the per-pair ratios (`paired_ratio`, compiled over eager speed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from train_vs_hf import SIZES, megacpt_engine, megacpt_trainer, random_batch, step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each, alternating")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each first (compilation)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainers = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        engine = megacpt_engine(args.size, device)
        if name == "compiled":
            engine.compile()  # what train.compile does (runtime/engine.py)
        trainers[name] = megacpt_trainer(engine, args.size, device)
    tokens, labels = random_batch(args.size, device)
    start = time.perf_counter()
    for step in trainers.values():
        for _ in range(args.warmup):
            step_seconds(step, tokens, labels)
    warmup_s = time.perf_counter() - start
    seconds = {name: [] for name in trainers}
    for pair in range(args.steps):
        for name in (("eager", "compiled") if pair % 2 == 0 else ("compiled", "eager")):
            seconds[name].append(step_seconds(trainers[name], tokens, labels))
        print(f"pair {pair}: eager {seconds['eager'][-1] * 1e3:,.0f} ms  compiled "
              f"{seconds['compiled'][-1] * 1e3:,.0f} ms", file=sys.stderr)
    rate = {name: tokens.numel() / statistics.median(times) for name, times in seconds.items()}
    print(json.dumps({
        "size": args.size, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup_s_both": round(warmup_s, 1),
        "eager_tokens_per_s": round(rate["eager"]), "compiled_tokens_per_s": round(rate["compiled"]),
        "ratio": round(rate["compiled"] / rate["eager"], 3),
        "paired_ratio": round(statistics.median(e / c for e, c in zip(seconds["eager"], seconds["compiled"])), 3),
        "pairs_compiled_won": sum(c < e for e, c in zip(seconds["eager"], seconds["compiled"]))}))


if __name__ == "__main__":
    main()
