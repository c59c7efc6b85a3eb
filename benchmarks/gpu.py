"""The GPU benchmark: megacpt's tokens/s, MFU, memory and checkpoint waits on one GPU, against Hugging Face.

    python benchmarks/gpu.py                               # CUDA: pythia-410m and llama-3.2-1b, bf16, seq 2048, ZeRO 1
    python benchmarks/gpu.py --device cpu --size tiny      # the same code path at a tiny size (a test runs it)

For each model, `megacpt train` runs (in a child process each, on random tokens) as:

- `eager`: the config as given, a synchronous checkpoint every `save_interval` steps;
- `recompute`: `train.activation_checkpointing: true`;
- `compile`: `train.compile: true`;
- `async_save`: `checkpoint.async_save: true` (ZeRO 1, as the other arms: the files written from a host copy);

and the same model, batch and tokens train in `transformers` with a plain PyTorch loop (SDPA attention, fused
AdamW, bf16 autocast over fp32 weights on a GPU; fp32 on CPU). Step time: the median of the steps after the
warm-up that saved no checkpoint, from a callback in the loop (`train(extra_callbacks=...)`, synchronised with
the device). MFU = tokens/s x FLOPs per token / peak, FLOPs per token = 6 x (parameters in matmuls, the
input embedding being a lookup; a tied embedding counts once, as the output layer) + 12 x layers x hidden x
sequence (attention scores and values, causal counted fully as in PaLM's appendix B); recompute's extra
forward is not model FLOPs. Peak: dense bf16 by device name (H100/H200 SXM 989 TFLOP/s), else measured.
Memory: the CUDA allocator's peak reserved bytes (on CPU: the process's peak RSS) against `megacpt plan`'s
total for the same config on one GPU. Checkpoint wait: `blocked_s` of the loop's mid-run checkpoint records.

Writes OUT/gpu_benchmark.json and OUT/gpu_benchmark.md and prints the table last; exits non-zero on any error.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent / "tests"))

# name: (model section, micro batch = global batch: one micro-batch per step)
MODELS = {
    "full": {
        "pythia-410m": ({"preset": "pythia-410m"}, 8),
        "llama-3.2-1b": ({"preset": "llama-3.2-1b"}, 4),
    },
    "tiny": {
        "neox-tiny": ({"preset": "tiny"}, 4),
        "llama-tiny": ({"family": "llama", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                        "num_query_groups": 2, "ffn_hidden_size": 128, "seq_length": 64, "vocab_size": 256,
                        "tie_embeddings": True}, 4),
    },
}
# arm: (config overrides, ZeRO stage)
ARMS = {
    "eager": ({}, 1),
    "recompute": ({"train": {"activation_checkpointing": True}}, 1),
    "compile": ({"train": {"compile": True}}, 1),
    "async_save": ({"checkpoint": {"async_save": True}}, 1),
}
STEPS = {"full": 20, "tiny": 8}
WARMUP = {"full": 5, "tiny": 2}  # untimed first steps (compilation, allocator warm-up)
# Dense bf16 tensor-core peaks (no sparsity), by a piece of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


def model_config(size: str, name: str):
    from megacpt.config import ModelConfig

    return ModelConfig(**MODELS[size][name][0])


def run_config(workdir: Path, size: str, name: str, arm: str, data: str) -> dict:
    """The `megacpt train` config of one model and arm."""
    model, batch = MODELS[size][name]
    overrides, stage = ARMS[arm]
    config = {
        "run_dir": str(workdir / name / arm),
        "model": model,
        "data": {"sources": [{"name": "random", "prefix": data}], "cache_dir": str(workdir / "cache")},
        "schedule": {"style": "constant", "max_lr": 1e-4, "warmup": 0},
        "train": {"steps": STEPS[size], "global_batch_size": batch, "micro_batch_size": batch,
                  "save_interval": STEPS[size] // 2, "log_interval": 1},
        "checkpoint": {"keep_last": 1},
        "deepspeed": {"zero_optimization": {"stage": stage}},  # bf16: megacpt's default on a GPU
    }
    for section, values in overrides.items():
        config[section] = {**config[section], **values}
    return config


def write_data(workdir: Path, size: str, name: str) -> str:
    """Random documents of one sample each, enough for every step of a run."""
    import numpy as np

    from datagen import random_documents, write_indexed

    model, batch = model_config(size, name), MODELS[size][name][1]
    documents = random_documents(0, batch * STEPS[size] + 8, model.seq_length + 1, model.vocab_size)
    dtype = np.uint16 if model.vocab_size <= 65535 else np.int32
    return write_indexed(workdir / f"{name}_data", documents, dtype=dtype)


# ------------------------------------------------------------------------------------------ child processes


def device_peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def megacpt_child(spec: dict) -> dict:
    """One `megacpt train` run in this process, with a callback that clocks every step."""
    from megacpt.config import load_config
    from megacpt.train.callbacks import Callback
    from megacpt.train.trainer import train

    class StepClock(Callback):
        """The time at the start of every step and at the end of the run (the device synchronised first)."""

        def __init__(self):
            self.times: list[float] = []
            self.device = None

        def before_step(self, loop, step: int) -> None:
            self.device = loop.world.device
            sync(self.device)
            self.times.append(time.perf_counter())

        def rewind(self, loop, step: int) -> None:
            raise RuntimeError("a benchmark run rolled back")

        def close(self) -> None:
            sync(self.device)
            self.times.append(time.perf_counter())

    clock = StepClock()
    train(load_config(spec["config"]), extra_callbacks=[clock])
    return {"step_s": [b - a for a, b in zip(clock.times, clock.times[1:])],
            "peak_memory_bytes": device_peak_memory(clock.device)}


def hf_child(spec: dict) -> dict:
    """The same model, batch and tokens in transformers with a plain PyTorch loop."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megacpt.config import padded_vocab_size
    from megacpt.model.families import FAMILIES
    from megacpt.weights.convert_command import hf_class, hf_config

    device = torch.device(spec["device"])
    size, name = spec["size"], spec["model"]
    model_cfg, batch = model_config(size, name), MODELS[size][name][1]
    config = hf_config(model_cfg, None)
    config.vocab_size = padded_vocab_size(model_cfg.vocab_size, 1)  # megacpt's embedding rows
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = hf_class(FAMILIES[model_cfg.family])(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=True)
    on_gpu = device.type == "cuda"
    documents = IndexedDataset(spec["data"])
    times = []
    for step in range(STEPS[size]):
        sample = torch.from_numpy(np.stack([documents[step * batch + i] for i in range(batch)]).astype(np.int64))
        tokens, labels = sample[:, :-1].to(device), sample[:, 1:].to(device)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)  # waits for the device
        times.append(time.perf_counter() - start)
    return {"step_s": times, "peak_memory_bytes": device_peak_memory(device)}


def run_child(spec: dict, workdir: Path) -> dict:
    path = workdir / f"{spec['model']}_{spec['arm']}.spec.json"
    path.write_text(json.dumps(spec))
    from megacpt.runtime.launcher_env import own_world_env

    # each child builds its own world of one: no RANK or MASTER_PORT of a process that already holds that port
    paths = [str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**own_world_env(), "PYTHONPATH": os.pathsep.join(paths)}
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(HERE), "--child", str(path)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise SystemExit(f"{spec['model']} {spec['arm']} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    out = json.loads(Path(str(path) + ".out").read_text())
    out["wall_s"] = time.perf_counter() - start
    return out


# ----------------------------------------------------------------------------------------------- figures


def peak_flops(device_name: str, measured) -> tuple[float, str]:
    """(FLOP/s, where it comes from): the dense bf16 peak of a known GPU, else `measured()`."""
    for piece, tflops in PEAK_TFLOPS.items():
        if piece in device_name:
            return tflops * 1e12, f"{device_name}: dense bf16 peak {tflops:g} TFLOP/s"
    rate, what = measured()
    return rate, f"{device_name}: measured {what} {rate / 1e12:.3g} TFLOP/s"


def measured_matmul(device) -> tuple[float, str]:
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ a
    sync(device)
    return reps * 2 * n**3 / (time.perf_counter() - start), f"{str(dtype).removeprefix('torch.')} matmul"


def plan_bytes(config: dict, device) -> float:
    """`megacpt plan`'s memory per GPU for this config on one GPU of this device's memory."""
    import torch

    from megacpt.config import RunConfig
    from megacpt.planning.capacity import Cluster, config_layout, estimate

    memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else 80.0
    run = RunConfig.model_validate(config)
    cluster = Cluster(1, 1, gpu_memory_gb=memory_gb)
    return estimate(run, cluster, config_layout(run, cluster)).total_bytes


def timed_tokens_per_s(step_s: list[float], tokens_per_step: int, warmup: int, skip: set[int]) -> float:
    """Tokens/s at the median step time of steps warmup+1.. that are not in `skip` (1-based)."""
    kept = [s for step, s in enumerate(step_s, 1) if step > warmup and step not in skip]
    return tokens_per_step / statistics.median(kept)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def save_waits(run_dir: Path) -> list[float]:
    return [r["blocked_s"] for r in records(run_dir) if r.get("event") == "checkpoint"]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir) if "loss" in r and "event" not in r]


def measure(args, workdir: Path) -> dict:
    import torch

    from megacpt.config import RunConfig
    from megacpt.planning.capacity import flops_per_token

    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, peak_source = peak_flops(device_name, lambda: measured_matmul(device))
    report = {"device": device_name, "size": args.size, "torch": torch.__version__, "peak_flops": peak,
              "peak_source": peak_source, "models": {}}
    for name in args.models or MODELS[args.size]:
        data = write_data(workdir, args.size, name)
        rows = {}
        for arm in ARMS:
            config = run_config(workdir, args.size, name, arm, data)
            run = RunConfig.model_validate(config)
            tokens_per_step = run.train.global_batch_size * run.model.seq_length
            flops = flops_per_token(run.model, run.padded_vocab_size)
            path = workdir / f"{name}_{arm}.json"
            path.write_text(json.dumps(config))
            out = run_child({"kind": "megacpt", "config": str(path), "model": name, "arm": arm,
                             "device": args.device, "size": args.size}, workdir)
            interval = run.train.save_interval
            rate = timed_tokens_per_s(out["step_s"], tokens_per_step, WARMUP[args.size],
                                      {s for s in range(1, run.train.steps + 1) if s % interval == 0})
            waits = save_waits(Path(config["run_dir"]))
            shutil.rmtree(Path(config["run_dir"]) / "checkpoints")  # a 1B model's tag is ~17 GB: one at a time
            rows[arm] = {"tokens_per_s": rate, "mfu": rate * flops / peak, "flops_per_token": flops,
                         "zero_stage": ARMS[arm][1], "peak_memory_bytes": out["peak_memory_bytes"],
                         "plan_bytes": plan_bytes(config, device), "save_wait_s": waits[:-1],
                         "last_save_wait_s": waits[-1], "wall_s": out["wall_s"]}
        eager = rows["eager"]
        for arm, row in rows.items():  # same seed and samples: each arm's losses against the eager run's
            row["losses"] = losses(workdir / name / arm)
            row["max_loss_diff"] = max(abs(a - b) for a, b in zip(row["losses"], eager["losses"]))
        out = run_child({"kind": "hf", "data": data, "model": name, "arm": "hf", "device": args.device,
                         "size": args.size}, workdir)
        hf_rate = timed_tokens_per_s(out["step_s"], tokens_per_step, WARMUP[args.size], set())
        rows["hf"] = {"tokens_per_s": hf_rate, "mfu": hf_rate * eager["flops_per_token"] / peak,
                      "peak_memory_bytes": out["peak_memory_bytes"], "wall_s": out["wall_s"]}
        report["models"][name] = {"parameters": parameter_count(run), "batch": run.train.global_batch_size,
                                  "seq_length": run.model.seq_length, "ratio_to_hf": eager["tokens_per_s"] / hf_rate,
                                  "arms": rows}
    return report


def parameter_count(run) -> int:
    from megacpt.planning.capacity import parameter_count as count

    return count(run.model, run.padded_vocab_size)


def markdown(report: dict) -> str:
    memory = "peak reserved" if report["device"] != "cpu" else "peak RSS"
    lines = [f"Device: {report['device']}, torch {report['torch']}; MFU against {report['peak_source']}.", "",
             f"| model | run | ZeRO | tokens/s | MFU | vs HF | {memory} GiB | plan GiB | save wait s (mid-run) | "
             "max loss diff vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, model in report["models"].items():
        hf = model["arms"]["hf"]["tokens_per_s"]
        for arm, row in model["arms"].items():
            waits = ", ".join(f"{w:.2f}" for w in row.get("save_wait_s", [])) or "-"
            plan = f"{row['plan_bytes'] / 2**30:.1f}" if "plan_bytes" in row else "-"
            diff = f"{row['max_loss_diff']:.2g}" if "max_loss_diff" in row else "-"
            lines.append(f"| {name} | {arm} | {row.get('zero_stage', '-')} | {row['tokens_per_s']:,.0f} | "
                         f"{row['mfu']:.1%} | {row['tokens_per_s'] / hf:.2f} | "
                         f"{row['peak_memory_bytes'] / 2**30:.1f} | {plan} | {waits} | {diff} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=sorted(MODELS), default="full")
    parser.add_argument("--out", default="gpu_benchmark", help="folder for gpu_benchmark.json and .md")
    parser.add_argument("--models", nargs="+", help="some of the size's models (default: all): "
                        + "; ".join(f"{size}: {' '.join(models)}" for size, models in MODELS.items()))
    parser.add_argument("--workdir", help="run dirs and data; default: a temporary folder, removed afterwards")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        out = megacpt_child(spec) if spec["kind"] == "megacpt" else hf_child(spec)
        Path(args.child + ".out").write_text(json.dumps(out))
        return
    import torch

    unknown = set(args.models or ()) - set(MODELS[args.size])
    if unknown:
        raise SystemExit(f"--models: {', '.join(sorted(unknown))} not among {', '.join(MODELS[args.size])}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --size tiny for the CPU check")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = measure(args, workdir)
    report["wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_benchmark.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "gpu_benchmark.md").write_text(table)
    print(f"wrote {out / 'gpu_benchmark.json'} and {out / 'gpu_benchmark.md'} ({report['wall_s']:.0f} s)")
    print(table)


if __name__ == "__main__":
    main()
