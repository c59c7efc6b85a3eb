"""`megacpt plan CONFIG [--nodes N --gpus-per-node G | --hostfile FILE] [--cpu] [--json FILE]`: will it fit, how long.

Reads only the config (no torch): the parameter count, memory per GPU for the config's own layout, the
largest micro batch that fits, the step time and days to the token budget at an assumed MFU, and the
layout `megacpt.planning.capacity.recommend` picks for the cluster. The launch scripts run it as their preflight, so a
bad hostfile or a world size the tensor-parallel degree does not divide stops a job before it starts. With
`--cpu` the ranks are CPU processes: only the layout is checked and shown (GPU memory and FLOPs do not apply).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from megacpt.cli_helpers import (
    add_overwrite_argument,
    add_set_argument,
    positive_float,
    positive_int,
    text_table,
    unit_fraction,
)
from megacpt.config import RunConfig, load_config
from megacpt.errors import ConfigError, UserError
from megacpt.files import write_output
from megacpt.planning.capacity import (
    FIT_FRACTION,
    GB,
    Cluster,
    Estimate,
    config_layout,
    estimate,
    flops_per_token,
    largest_micro_batch,
    parameter_count,
    parameters_per_rank,
    recommend,
    training_precision,
)
from megacpt.planning.hostfile import read_hostfile, uniform_slots

DEFAULT_NODES, DEFAULT_GPUS_PER_NODE = 1, 8
_PARTS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer_states", "optimizer states"),
          ("activations", "activations"), ("reserved", "reserved"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="JSON run config")
    add_set_argument(parser)
    parser.add_argument("--nodes", type=positive_int, help=f"nodes (default {DEFAULT_NODES})")
    parser.add_argument("--gpus-per-node", type=positive_int, help=f"GPUs per node (default {DEFAULT_GPUS_PER_NODE})")
    parser.add_argument("--hostfile", metavar="FILE", help="take nodes and GPUs per node from a DeepSpeed hostfile")
    parser.add_argument("--gpu-memory-gb", type=positive_float,
                        help=f"memory of one GPU in GB (10^9 bytes); default {Cluster.gpu_memory_gb:g}")
    parser.add_argument("--gpu-tflops", type=positive_float,
                        help=f"peak dense bf16 TFLOP/s of one GPU; default {Cluster.gpu_tflops:g} (H100 SXM)")
    parser.add_argument("--mfu", type=unit_fraction, help=f"assumed model FLOPs utilisation; default {Cluster.mfu:g}")
    parser.add_argument("--cpu", action="store_true",
                        help="the ranks are CPU processes (--gpus-per-node of them per node, or the hostfile's "
                             "slots): check and show the layout only, no memory or time estimate")
    parser.add_argument("--json", metavar="FILE", help="also write the plan to FILE as JSON")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    gpu = {"gpu_memory_gb": args.gpu_memory_gb, "gpu_tflops": args.gpu_tflops, "mfu": args.mfu}
    given = {key: value for key, value in gpu.items() if value is not None}
    if args.cpu:
        if given:
            raise UserError(f"--{next(iter(given)).replace('_', '-')} describes a GPU; --cpu plans CPU processes")
        return _cpu_plan(args, config, Cluster(*_nodes_and_gpus(args), cpu=True))
    cluster = Cluster(*_nodes_and_gpus(args), **given)
    best = recommend(config, cluster)
    try:
        layout = config_layout(config, cluster)
    except ConfigError as e:
        raise UserError(f"{e}. For this cluster megacpt plan recommends {best.layout.describe()}") from None
    own = estimate(config, cluster, layout)
    largest = largest_micro_batch(config, cluster, layout)
    print(_report(args.config, config, cluster, own, largest, best))
    if args.json:
        plan = _plan_json(args.config, config, cluster, own, largest, best)
        inputs = [args.config, *([args.hostfile] if args.hostfile else [])]
        write_output(args.json, json.dumps(plan, indent=2) + "\n", "--json", args.overwrite, inputs)
    return 0


def _cpu_plan(args: argparse.Namespace, config: RunConfig, cluster: Cluster) -> int:
    """The layout of CPU processes: the checks the launch needs (world size, tensor parallel, batch arithmetic)."""
    layout = config_layout(config, cluster)
    accumulation = config.train.global_batch_size // layout.data // layout.micro_batch
    lines = _report_head(args.config, config, cluster, layout) + [
        "", f"layout: {layout.describe()}, gradient accumulation {accumulation}",
        "  CPU processes: memory and step time are not estimated"]
    print("\n".join(lines))
    if args.json:
        vocab = config.padded_vocab_size
        plan = {"config": args.config, "parameters": parameter_count(config.model, vocab),
                "padded_vocab_size": vocab, "cluster": asdict(cluster), "config_layout": {"layout": asdict(layout)}}
        inputs = [args.config, *([args.hostfile] if args.hostfile else [])]
        write_output(args.json, json.dumps(plan, indent=2) + "\n", "--json", args.overwrite, inputs)
    return 0


def _nodes_and_gpus(args: argparse.Namespace) -> tuple[int, int]:
    if args.hostfile is None:
        return args.nodes or DEFAULT_NODES, args.gpus_per_node or DEFAULT_GPUS_PER_NODE
    if args.nodes or args.gpus_per_node:
        raise UserError("give either --hostfile or --nodes/--gpus-per-node, not both")
    hosts = read_hostfile(args.hostfile)
    return len(hosts), uniform_slots(hosts, args.hostfile)


def _groups(model) -> str:
    """' (8 key/value groups)' for grouped-query attention, '' for multi-head attention."""
    grouped = model.num_query_groups != model.num_attention_heads
    return f" ({model.num_query_groups} key/value groups)" if grouped else ""


def _report_head(path: str, config: RunConfig, cluster: Cluster, layout) -> list[str]:
    """The lines both plans start with: config, model, parameters, cluster, precision."""
    model, vocab = config.model, config.padded_vocab_size
    if cluster.cpu:  # megacpt trains in fp32 without a GPU
        hardware, precision = "", "fp32 weights and gradients (CPU processes train in fp32)"
    else:
        hardware = (f", {cluster.gpu_memory_gb:g} GB and {cluster.gpu_tflops:g} TFLOP/s each, assumed MFU "
                    f"{cluster.mfu:.0%}")
        p = training_precision(config.deepspeed)
        precision = f"{p.weights} weights, {p.gradients} gradient accumulation"
    return [
        f"megacpt plan: {path}",
        f"model        {model.preset or 'custom'} ({model.family}): {model.num_layers} layers, hidden "
        f"{model.hidden_size}, {model.num_attention_heads} heads{_groups(model)}, FFN {model.ffn_hidden_size}, "
        f"seq {model.seq_length}, "
        f"vocab {model.vocab_size} padded to {vocab} (TP {config.parallel.tensor})",
        f"parameters   {parameter_count(model, vocab):,} "
        f"({parameters_per_rank(model, vocab, layout.tensor):,} per tensor-parallel rank)",
        f"cluster      {cluster.describe()} = {cluster.world_size}{hardware}",
        f"precision    {precision}",
    ]


def _report(path: str, config: RunConfig, cluster: Cluster, own: Estimate, largest: int, best: Estimate) -> str:
    model, train = config.model, config.train
    vocab = config.padded_vocab_size
    tokens = train.global_batch_size * model.seq_length
    share = train.global_batch_size // own.layout.data
    lines = [
        *_report_head(path, config, cluster, own.layout),
        "",
        f"config layout: {own.layout.describe()}, gradient accumulation {share // own.layout.micro_batch}",
        *_memory_lines(own, cluster),
        f"  largest micro batch that fits: {largest}"
        f" (largest dividing the {share} samples per data-parallel rank: {_largest_divisor(share, largest)})",
        f"  step time {own.step_seconds:.2f} s ({tokens:,} tokens x {flops_per_token(model, vocab):.3g} FLOP/token); "
        f"{train.steps:,} steps = {train.steps * tokens / 1e9:.1f}B tokens in {own.days:.2f} days",
        "",
        f"recommended: {best.layout.describe()}" + (" (the config's own)" if best.layout == own.layout else ""),
        f"  memory {best.total_bytes / GB:.1f} GB per GPU, step time {best.step_seconds:.2f} s, "
        f"{best.days:.2f} days",
    ]
    return "\n".join(lines)


def _memory_lines(e: Estimate, cluster: Cluster) -> list[str]:
    verdict = "fits" if e.fits else "does NOT fit"
    limit = f"limit {cluster.memory_limit_bytes / GB:g} = {FIT_FRACTION:.0%} of {cluster.gpu_memory_gb:g}"
    rows = [(label, f"{e.memory[key] / GB:.2f}") for key, label in _PARTS]
    rows.append(("total", f"{e.total_bytes / GB:.2f}", f"{verdict} ({limit})"))
    return ["  memory per GPU (GB)", text_table(rows, indent="    ", align=("left", "right", "left"))]


def _largest_divisor(share: int, limit: int) -> int:
    return max((m for m in range(1, limit + 1) if share % m == 0), default=0)


def _estimate_json(e: Estimate) -> dict:
    return {
        "layout": asdict(e.layout),
        "memory_gb": {**{key: e.memory[key] / GB for key, _ in _PARTS}, "total": e.total_bytes / GB},
        "fits": e.fits,
        "step_seconds": e.step_seconds,
        "days": e.days,
    }


def _plan_json(path: str, config: RunConfig, cluster: Cluster, own: Estimate, largest: int, best: Estimate) -> dict:
    vocab = config.padded_vocab_size
    return {
        "config": path,
        "parameters": parameter_count(config.model, vocab),
        "padded_vocab_size": vocab,
        "cluster": asdict(cluster),
        "config_layout": {**_estimate_json(own), "largest_micro_batch": largest},
        "recommended": _estimate_json(best),
        "tokens": config.train.steps * config.train.global_batch_size * config.model.seq_length,
    }
