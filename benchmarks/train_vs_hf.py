"""Training throughput: megacpt (megatron-core model in a DeepSpeed engine, one process) against Hugging Face
`GPTNeoXForCausalLM` (SDPA attention) with a plain PyTorch AdamW loop. Same dims, batch, sequence, AdamW,
same random tokens; the two alternate in one run so machine load hits both alike.

    python benchmarks/train_vs_hf.py --size demo --reps 5        # CPU, fp32
    python benchmarks/train_vs_hf.py --size 25m --reps 5
    python benchmarks/train_vs_hf.py --size pythia-410m --reps 5  # GPU, bf16

On CPU both train in fp32 (megacpt's CPU fallback). On a GPU megacpt trains as it does there (DeepSpeed bf16
with fp32 master weights, fused Adam) and Hugging Face under bf16 autocast with fp32 weights and fused AdamW;
the JSON then also gives model FLOPs utilisation against the device's measured bf16 matmul peak.

Prints one line per repetition and, on the last line, JSON with the median tokens/s of each and their ratio,
and the median of the per-repetition ratios (`paired_ratio`: each pair ran back to back, so it shares the
machine's load of the moment, which moves single repetitions by 10-20% on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

# name: (megacpt preset, micro batch); the demo model and a ~25M-parameter one at sequence 512 for CPU,
# Pythia sizes at sequence 2048 for a GPU.
SIZES = {
    "demo": ("cpu-small", 8),
    "25m": ("cpu-25m", 4),
    "pythia-160m": ("pythia-160m", 8),
    "pythia-410m": ("pythia-410m", 8),
}


def model_config(size: str):
    from megacpt.config import ModelConfig

    return ModelConfig(preset=SIZES[size][0])


def padded_vocab(model_cfg) -> int:
    """The embedding rows both models get (Pythia's HF checkpoints are padded the same way: 50304)."""
    from megacpt.config import padded_vocab_size

    return padded_vocab_size(model_cfg.vocab_size, 1)


def megacpt_engine(size: str, device: torch.device, activation_checkpointing: bool = False):
    """megacpt's model in its DeepSpeed engine, built as `megacpt train` builds it."""
    from megacpt.config import RunConfig
    from megacpt.distributed import MegatronMPU, setup_world
    from megacpt.engine import deepspeed_config, initialize
    from megacpt.model.neox import build_gpt_neox
    from megacpt.schedule import StageScheduler

    setup_world(1, 0)
    batch = SIZES[size][1]
    config = RunConfig.model_validate({
        "run_dir": "/tmp/megacpt-bench", "model": model_config(size).model_dump(),
        "data": {"sources": [{"name": "x", "prefix": "unused"}]},
        "schedule": {"style": "constant", "max_lr": 1e-4},
        "train": {"steps": 10**6, "global_batch_size": batch, "micro_batch_size": batch,
                  "activation_checkpointing": activation_checkpointing},
    })
    model = build_gpt_neox(config.model, config.padded_vocab_size, 1,
                           activation_checkpointing=activation_checkpointing, cpu_init=device.type == "cpu")
    engine, _, _ = initialize(model, deepspeed_config(config, 1),
                              lambda opt: StageScheduler(opt, config.schedule, 10**6), MegatronMPU)
    return engine


def megacpt_trainer(engine, size: str, device: torch.device):
    model_cfg, batch = model_config(size), SIZES[size][1]
    positions = torch.arange(model_cfg.seq_length, device=device).unsqueeze(0).expand(batch, -1)

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = engine(tokens, positions, None, labels=labels).mean()
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def hf_trainer(size: str, device: torch.device):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model_cfg = model_config(size)
    config = GPTNeoXConfig(vocab_size=padded_vocab(model_cfg), hidden_size=model_cfg.hidden_size,
                           num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_attention_heads,
                           intermediate_size=model_cfg.ffn_hidden_size, max_position_embeddings=model_cfg.seq_length,
                           rotary_pct=model_cfg.rotary_pct, use_parallel_residual=True, tie_word_embeddings=False,
                           attn_implementation="sdpa")
    model = GPTNeoXForCausalLM(config).to(device).train()
    on_gpu = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=on_gpu or None)

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def tokens_per_s(step, size: str, steps: int, device: torch.device) -> float:
    model_cfg, batch = model_config(size), SIZES[size][1]
    gen = torch.Generator().manual_seed(0)
    sample = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.seq_length + 1), generator=gen).to(device)
    tokens, labels = sample[:, :-1].contiguous(), sample[:, 1:].contiguous()
    step(tokens, labels)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(tokens, labels)
    float(loss)  # waits for the device
    return steps * batch * model_cfg.seq_length / (time.perf_counter() - start)


def measured_bf16_peak_flops(device: torch.device) -> float:
    """The device's dense bf16 matmul rate, measured: the denominator of MFU."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    torch.cuda.synchronize()
    return reps * 2 * 8192**3 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ours = megacpt_trainer(megacpt_engine(args.size, device), args.size, device)
    theirs = hf_trainer(args.size, device)
    results = {"megacpt": [], "hf": []}
    for rep in range(args.reps):
        results["megacpt"].append(tokens_per_s(ours, args.size, args.steps, device))
        results["hf"].append(tokens_per_s(theirs, args.size, args.steps, device))
        print(f"rep {rep}: megacpt {results['megacpt'][-1]:,.0f} tok/s  hf {results['hf'][-1]:,.0f} tok/s", file=sys.stderr)
    median = {k: statistics.median(v) for k, v in results.items()}
    model_cfg = model_config(args.size)
    report = {"size": args.size, **model_cfg.model_dump(exclude={"preset"}), "batch": SIZES[args.size][1],
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "reps": args.reps,
              "megacpt_tokens_per_s": round(median["megacpt"]), "hf_tokens_per_s": round(median["hf"]),
              "ratio": round(median["megacpt"] / median["hf"], 3),
              "paired_ratio": round(statistics.median(a / b for a, b in zip(results["megacpt"], results["hf"])), 3),
              "all": results}
    if device.type == "cuda":
        from megacpt.plan import flops_per_token

        flops = flops_per_token(model_cfg, padded_vocab(model_cfg))
        peak = measured_bf16_peak_flops(device)
        report |= {"bf16_peak_tflops": round(peak / 1e12, 1),
                   "megacpt_mfu": round(median["megacpt"] * flops / peak, 3), "hf_mfu": round(median["hf"] * flops / peak, 3)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
