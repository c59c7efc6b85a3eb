"""Capacity planning: parameter count, memory per GPU, step time and the best layout for a cluster.

Pure arithmetic on a validated `RunConfig`, so that `megacpt plan` answers in a second, before any GPU is
booked, and tests can check every number against its formula. docs/PLAN.md derives the formulas and states
the assumptions. What this module does not do: measure anything, import torch, or model pipeline
parallelism (megacpt has none) or ZeRO offload (refused rather than mis-estimated).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

from megacpt.config import ModelConfig, RunConfig, batch_arithmetic, padded_vocab_size
from megacpt.errors import ConfigError, UserError
from megacpt.model.families import FAMILIES
from megacpt.model.size import parameter_count, parameters_per_rank

GB = 1e9
RESERVED_BYTES = 4 * GB  # CUDA context, NCCL, DeepSpeed's reduce/all-gather buckets (5e8 elements each)
OPTIMIZER_BYTES = 16  # per parameter: fp32 master copy, Adam's two moments, fp32 gradient partition at the step
FIT_FRACTION = 0.9  # of GPU memory an estimate may use: allocator fragmentation and the estimate's own error
RECOMPUTE_COST = 4 / 3  # full recompute repeats the forward pass: 8 instead of 6 FLOPs per parameter and token
_FP32_NAMES = {"fp32", "float32", "float", "torch.float32"}


@dataclass(frozen=True)
class Cluster:
    """The machines a run is planned for."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float = 80.0
    gpu_tflops: float = 989.0  # H100 SXM dense bf16 peak
    mfu: float = 0.4  # model FLOPs utilisation assumed without recompute
    cpu: bool = False  # the ranks are CPU processes (gpus_per_node of them per node): only the layout is planned

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def memory_limit_bytes(self) -> float:
        return FIT_FRACTION * self.gpu_memory_gb * GB

    def describe(self) -> str:
        return f"{self.nodes} node{'s' * (self.nodes != 1)} x {self.gpus_per_node} {self.rank_name}"

    @property
    def rank_name(self) -> str:
        return "CPU processes" if self.cpu else "GPUs"


@dataclass(frozen=True)
class Layout:
    """How one run is split over the cluster."""

    tensor: int
    data: int
    zero_stage: int
    micro_batch: int
    activation_checkpointing: bool

    def describe(self) -> str:
        recompute = "on" if self.activation_checkpointing else "off"
        return (f"TP {self.tensor} x DP {self.data}, ZeRO-{self.zero_stage}, "
                f"micro batch {self.micro_batch}, activation checkpointing {recompute}")


@dataclass(frozen=True)
class Estimate:
    """Memory per GPU (bytes per part), whether it fits, and the time the run takes, for one layout."""

    layout: Layout
    memory: dict[str, float]
    fits: bool
    step_seconds: float
    days: float

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())


# -------------------------------------------------------------------------------------------- memory


_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Precision:
    """The dtypes of the trained weights and of the accumulated gradients."""

    weights: str
    gradients: str

    @property
    def weight_bytes(self) -> int:
        return _BYTES[self.weights]

    @property
    def grad_bytes(self) -> int:
        return _BYTES[self.gradients]


def training_precision(ds: dict) -> Precision:
    """What the engine trains in: bf16 unless the DeepSpeed section says fp16 or turns bf16 off (megacpt's
    default); gradients accumulate in the same dtype unless `data_types.grad_accum_dtype` is fp32."""
    if ds.get("bf16", {"enabled": "fp16" not in ds}).get("enabled", False):
        weights = "bf16"
    else:
        weights = "fp16" if ds.get("fp16", {}).get("enabled", False) else "fp32"
    accumulate = str(ds.get("data_types", {}).get("grad_accum_dtype", "")).lower()
    return Precision(weights, "fp32" if accumulate in _FP32_NAMES else weights)


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a DeepSpeed section (megacpt's default is 0); offload is refused, not mis-estimated."""
    zero = ds.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") != "none":
            raise ConfigError(f"deepspeed.zero_optimization.{key}", "megacpt plan does not model ZeRO offload")
    return int(zero.get("stage", 0))


def activation_bytes(model: ModelConfig, padded_vocab: int, tensor: int, micro_batch: int, recompute: bool) -> float:
    """Activation memory of one micro-batch at its peak (Korthikanti et al. 2022, no sequence parallelism).

    A layer keeps s*b*h*10 bytes on every tensor-parallel rank (the two norms' inputs, the inputs of the QKV
    and first MLP matmuls, two dropout masks) and `layer_split_bytes` divided over them. SDPA's
    flash/memory-efficient kernels store no s x s attention matrix, so the paper's 5*a*s/h term is absent.
    With full recompute a layer keeps only its bf16 input (2*s*b*h) and one layer at a time is recomputed. The
    output layer adds the final norm's input and output (4*s*b*h) and bf16 logits with their fp32 softmax
    (6*s*b*V/t).
    """
    s, b, h, t = model.seq_length, micro_batch, model.hidden_size, tensor
    layer = s * b * (10 * h + layer_split_bytes(model) / t)
    output = s * b * (4 * h + 6 * padded_vocab / t)
    stored = model.num_layers * 2 * s * b * h + layer if recompute else model.num_layers * layer
    return stored + output


def layer_split_bytes(model: ModelConfig) -> float:
    """Bytes per token of one layer's activations that tensor parallelism divides, in bf16.

    Attention keeps the query (h), key and value (h*g/a each with g key/value groups of a heads) and the
    attention output (h): 2*(2h + 2h*g/a). The MLP of inner size F keeps, for GELU, its input and output
    (2*2F); for SwiGLU, down(silu(gate x) * up x), the gate and up halves of fc1's output, silu's output and
    the product (2*4F). GPT-NeoX (g = a, F = 4h): 8h + 16h = 24h, Korthikanti et al.'s 24.
    """
    h, f = model.hidden_size, model.ffn_hidden_size
    attention = 2 * (2 * h + 2 * h * model.num_query_groups / model.num_attention_heads)
    mlp = 2 * (4 if FAMILIES[model.family].gated_mlp else 2) * f
    return attention + mlp


def memory_per_gpu(model: ModelConfig, layout: Layout, precision: Precision) -> dict[str, float]:
    """Bytes per GPU split into weights, gradients, optimizer states, activations and a fixed reserve.

    ZeRO-1 partitions the optimizer states over the data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3
    also the weights.
    """
    vocab = padded_vocab_size(model.vocab_size, layout.tensor)
    params = parameters_per_rank(model, vocab, layout.tensor)
    dp, z = layout.data, layout.zero_stage
    return {
        "weights": precision.weight_bytes * params / (dp if z >= 3 else 1),
        "gradients": precision.grad_bytes * params / (dp if z >= 2 else 1),
        "optimizer_states": OPTIMIZER_BYTES * params / (dp if z >= 1 else 1),
        "activations": activation_bytes(model, vocab, layout.tensor, layout.micro_batch,
                                        layout.activation_checkpointing),
        "reserved": RESERVED_BYTES,
    }


# ---------------------------------------------------------------------------------------------- time


def flops_per_token(model: ModelConfig, padded_vocab: int) -> float:
    """Model FLOPs of one trained token: 6 per matmul parameter (the input embedding is a lookup, unless it is
    tied to the output layer) plus attention."""
    lookup = 0 if model.tie_embeddings else padded_vocab * model.hidden_size
    matmul_params = parameter_count(model, padded_vocab) - lookup
    return 6 * matmul_params + 12 * model.num_layers * model.hidden_size * model.seq_length


def step_seconds(config: RunConfig, cluster: Cluster, layout: Layout) -> float:
    """One optimizer step at the assumed MFU; recompute repeats the forward pass."""
    vocab = padded_vocab_size(config.model.vocab_size, layout.tensor)
    tokens = config.train.global_batch_size * config.model.seq_length
    flops = tokens * flops_per_token(config.model, vocab) * (RECOMPUTE_COST if layout.activation_checkpointing else 1.0)
    return flops / (cluster.world_size * cluster.gpu_tflops * 1e12 * cluster.mfu)


# ------------------------------------------------------------------------------------------- layouts


def estimate(config: RunConfig, cluster: Cluster, layout: Layout) -> Estimate:
    """Memory and time of `config` trained with `layout` on `cluster`."""
    memory = memory_per_gpu(config.model, layout, training_precision(config.deepspeed))
    seconds = step_seconds(config, cluster, layout)
    return Estimate(layout, memory, sum(memory.values()) <= cluster.memory_limit_bytes, seconds,
                    seconds * config.train.steps / 86400)


def config_layout(config: RunConfig, cluster: Cluster) -> Layout:
    """The layout the config asks for on this cluster; a ConfigError when it cannot run there."""
    tp = config.parallel.tensor
    if cluster.world_size % tp:
        raise ConfigError("parallel.tensor", f"the world size {cluster.world_size} ({cluster.describe()}) is not "
                          f"divisible by parallel.tensor {tp}")
    data = cluster.world_size // tp
    batch_arithmetic(config.train, data)
    return Layout(tp, data, zero_stage(config.deepspeed), config.train.micro_batch_size,
                  config.train.activation_checkpointing)


def largest_micro_batch(config: RunConfig, cluster: Cluster, layout: Layout) -> int:
    """The largest micro batch (up to one rank's share of the global batch) that fits; 0 if none does."""
    share = config.train.global_batch_size // layout.data
    best = 0
    for micro in range(1, share + 1):
        if not estimate(config, cluster, replace(layout, micro_batch=micro)).fits:
            break
        best = micro
    return best


def candidate_layouts(config: RunConfig, cluster: Cluster) -> Iterator[Layout]:
    """Every layout that can run the config: TP inside a node and dividing the heads, the key/value groups and
    the FFN, ZeRO at the config's stage or above, a micro batch that divides each rank's share of the global
    batch."""
    model = config.model
    for tp in range(1, cluster.gpus_per_node + 1):
        if (cluster.gpus_per_node % tp or model.num_attention_heads % tp or model.num_query_groups % tp
                or model.ffn_hidden_size % tp):
            continue
        data = cluster.world_size // tp
        if config.train.global_batch_size % data:
            continue
        share = config.train.global_batch_size // data
        for stage in range(zero_stage(config.deepspeed), 4):
            for recompute in (False, True):
                for micro in range(1, share + 1):
                    if share % micro == 0:
                        yield Layout(tp, data, stage, micro, recompute)


def recommend(config: RunConfig, cluster: Cluster) -> Estimate:
    """The layout to train with: of those that fit, the one with the least extra work, in this order.

    1. No recompute (full recompute repeats the forward pass: a third more compute).
    2. The lowest ZeRO stage (ZeRO-2 reduces gradients at every micro-batch instead of once per step, ZeRO-3
       also all-gathers the weights in every forward and backward, across nodes).
    3. The smallest tensor-parallel degree (two activation all-reduces per layer, inside the node).
    4. The largest micro batch (fewer, larger kernels and accumulation steps).
    Raises a UserError naming the reason when no layout can run or none fits.
    """
    estimates = [estimate(config, cluster, layout) for layout in candidate_layouts(config, cluster)]
    if not estimates:
        raise UserError(
            f"no layout of {cluster.describe()} can run this config: tensor parallel must divide the "
            f"{cluster.gpus_per_node} GPUs of a node, the {config.model.num_attention_heads} heads, the "
            f"{config.model.num_query_groups} key/value groups and the FFN size, "
            f"and train.global_batch_size {config.train.global_batch_size} must be a multiple of the "
            f"data-parallel size (world size / tensor parallel)")
    fitting = [e for e in estimates if e.fits]
    if not fitting:
        smallest = min(estimates, key=lambda e: e.total_bytes)
        raise UserError(
            f"no layout fits in {cluster.gpu_memory_gb:g} GB per GPU on {cluster.describe()}: the smallest "
            f"estimate is {smallest.total_bytes / GB:.1f} GB ({smallest.layout.describe()}), above the "
            f"{cluster.memory_limit_bytes / GB:g} GB limit ({FIT_FRACTION:.0%}); use more GPUs or GPUs with more "
            "memory (megacpt has no pipeline parallelism: tensor parallelism stays inside a node, and ZeRO-3 "
            "partitions the rest over the data-parallel ranks)")
    return min(fitting, key=lambda e: (e.layout.activation_checkpointing, e.layout.zero_stage, e.layout.tensor,
                                       -e.layout.micro_batch))
