"""Activation memory of a megacpt training step with and without activation checkpointing (megatron-core's
full recompute), same model and batch, each setting in its own process.

Two measures: the bytes autograd keeps for the backward pass at the end of the forward (every tensor saved
for backward, counted once per storage: exactly what recompute is meant to shrink), and the process's peak
RSS over a few training steps (everything: libraries, weights, Adam's moments, allocator slack).

    python benchmarks/activation_memory.py --size 25m

Prints JSON on its last line: both measures for each setting, and the savings.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def saved_for_backward_bytes(forward) -> int:
    """Bytes of the distinct storages autograd saves while `forward()` runs."""
    import torch

    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    loss.backward()
    return sum(storages.values())


def child(size: str, recompute: bool) -> None:
    import torch

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from train_vs_hf import SIZES, megacpt_engine, megacpt_trainer, model_config, tokens_per_s

    cpu = torch.device("cpu")
    model_cfg, batch = model_config(size), SIZES[size][1]
    engine = megacpt_engine(size, cpu, recompute)
    rate = tokens_per_s(megacpt_trainer(engine, size, cpu), size, steps=3, device=cpu)
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.seq_length))
    positions = torch.arange(model_cfg.seq_length).unsqueeze(0).expand(batch, -1)
    saved = saved_for_backward_bytes(lambda: engine.module(tokens, positions, None, labels=tokens).mean())
    engine.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"saved_for_backward_mib": round(saved / 2**20), "peak_rss_mib": round(peak),
                      "tokens_per_s": round(rate)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="25m")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.size, args.child == "on")
    results = {}
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--child", setting],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[setting] = json.loads(out)
        print(f"activation checkpointing {setting}: {results[setting]}", file=sys.stderr)
    off, on = results["off"], results["on"]
    print(json.dumps({"size": args.size, "off": off, "on": on,
                      "saved_for_backward_saving":
                          round(1 - on["saved_for_backward_mib"] / off["saved_for_backward_mib"], 3),
                      "peak_rss_saving_mib": off["peak_rss_mib"] - on["peak_rss_mib"]}))


if __name__ == "__main__":
    main()
