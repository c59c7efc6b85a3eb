"""Training throughput: megacpt (megatron-core model in a DeepSpeed engine, one process) against Hugging Face
`GPTNeoXForCausalLM` (SDPA attention) with a plain PyTorch AdamW loop. Same dims, batch, sequence, AdamW,
same random tokens; the two alternate step by step in one run (the order flipping every pair), so the load
of the moment hits both alike.

    python benchmarks/train_vs_hf.py --size demo --steps 30       # CPU, fp32
    python benchmarks/train_vs_hf.py --size 25m --steps 20
    python benchmarks/train_vs_hf.py --size pythia-410m --steps 20  # GPU, bf16

On CPU both train in fp32 (megacpt's CPU fallback). On a GPU megacpt trains as it does there (DeepSpeed bf16
with fp32 master weights, fused Adam) and Hugging Face under bf16 autocast with fp32 weights and fused AdamW;
the JSON then also gives model FLOPs utilisation against the device's measured bf16 matmul peak.

Prints one line per pair of steps and, on the last line, JSON with each side's tokens/s at its median step
time and their ratio, and the median of the per-pair ratios (`paired_ratio`: the two steps of a pair ran
back to back under the same machine load, which moves single steps by 10-20% on a shared machine).
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
    from megacpt.model.gpt import build_gpt
    from megacpt.runtime.distributed import MegatronMPU, setup_world
    from megacpt.runtime.engine import deepspeed_config, initialize
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
    model = build_gpt(config.model, config.padded_vocab_size, 1,
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


def random_batch(size: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random tokens and next-token labels for both trainers."""
    model_cfg, batch = model_config(size), SIZES[size][1]
    gen = torch.Generator().manual_seed(0)
    sample = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.seq_length + 1), generator=gen).to(device)
    return sample[:, :-1].contiguous(), sample[:, 1:].contiguous()


def step_seconds(step, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    start = time.perf_counter()
    float(step(tokens, labels))  # waits for the device
    return time.perf_counter() - start


def tokens_per_s(step, size: str, steps: int, device: torch.device) -> float:
    """One trainer's throughput over `steps` consecutive steps after one warm-up step."""
    tokens, labels = random_batch(size, device)
    step_seconds(step, tokens, labels)
    return steps * tokens.numel() / sum(step_seconds(step, tokens, labels) for _ in range(steps))


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
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each trainer, alternating")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each trainer first")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    trainers = {"megacpt": megacpt_trainer(megacpt_engine(args.size, device), args.size, device),
                "hf": hf_trainer(args.size, device)}
    tokens, labels = random_batch(args.size, device)
    for step in trainers.values():
        for _ in range(args.warmup):
            step_seconds(step, tokens, labels)
    seconds = {name: [] for name in trainers}
    for pair in range(args.steps):
        for name in (("megacpt", "hf") if pair % 2 == 0 else ("hf", "megacpt")):
            seconds[name].append(step_seconds(trainers[name], tokens, labels))
        print(f"pair {pair}: megacpt {seconds['megacpt'][-1] * 1e3:,.0f} ms  hf {seconds['hf'][-1] * 1e3:,.0f} ms",
              file=sys.stderr)
    median = {name: tokens.numel() / statistics.median(times) for name, times in seconds.items()}
    model_cfg = model_config(args.size)
    report = {"size": args.size, **model_cfg.model_dump(exclude={"preset"}), "batch": SIZES[args.size][1],
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "steps": args.steps,
              "megacpt_tokens_per_s": round(median["megacpt"]), "hf_tokens_per_s": round(median["hf"]),
              "ratio": round(median["megacpt"] / median["hf"], 3),
              "paired_ratio": round(statistics.median(h / m for m, h in zip(seconds["megacpt"], seconds["hf"])), 3),
              "step_ms": {name: [round(t * 1e3) for t in times] for name, times in seconds.items()}}
    if device.type == "cuda":
        from megacpt.planning.capacity import flops_per_token

        flops = flops_per_token(model_cfg, padded_vocab(model_cfg))
        peak = measured_bf16_peak_flops(device)
        report |= {"bf16_peak_tflops": round(peak / 1e12, 1),
                   "megacpt_mfu": round(median["megacpt"] * flops / peak, 3),
                   "hf_mfu": round(median["hf"] * flops / peak, 3)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
