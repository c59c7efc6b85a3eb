"""`megacpt plan`: the parameter formula equals the model megacpt builds, memory follows the ZeRO and
activation formulas of docs/PLAN.md, the 10B fits on 8 nodes x 8 x 80 GB, and impossible requests exit 2."""
import json
import os
from pathlib import Path

import pytest
import torch

from megacpt.cli import main
from megacpt.config import ModelConfig, load_config, padded_vocab_size
from megacpt.model.presets import PRESETS
from megacpt.planning.capacity import (
    GB,
    OPTIMIZER_BYTES,
    RESERVED_BYTES,
    Cluster,
    Layout,
    Precision,
    activation_bytes,
    flops_per_token,
    memory_per_gpu,
    parameter_count,
    parameters_per_rank,
    recommend,
)

REPO = Path(__file__).resolve().parents[1]
TEN_B = str(REPO / "configs" / "ibrahim_10b_cpt_cosine.json")


@pytest.fixture(scope="module")
def world_of_one():
    """megatron's parallel state for one process (what building a model needs); left as found afterwards."""
    from megacpt.runtime.distributed import setup_world, teardown_world

    existed = torch.distributed.is_initialized()
    environ = dict(os.environ)
    setup_world(1, 0)
    yield
    if not existed:
        teardown_world()
        os.environ.clear()
        os.environ.update(environ)


def neox_parameters_by_hand(layers: int, h: int, ffn: int, vocab: int, tp: int = 1) -> int:
    """GPT-NeoX parameters on one of `tp` tensor-parallel ranks, counted from the architecture: per layer QKV
    (3h x h + 3h) and fc1 (ffn x h + ffn) split by rows, dense (h x h) and fc2 (h x ffn) split by columns with
    their biases (h each) whole, two LayerNorms (2 x 2h); untied input embedding and output layer (vocab x h
    each, split by vocabulary rows); the final LayerNorm (2h)."""
    split = (3 * h * h + 3 * h) + (ffn * h + ffn) + h * h + h * ffn
    whole = h + h + 2 * 2 * h
    return layers * (split // tp + whole) + 2 * vocab * h // tp + 2 * h


def llama_parameters_by_hand(layers: int, h: int, heads: int, groups: int, ffn: int, vocab: int, tied: bool,
                             qkv_bias: bool = False, tp: int = 1) -> int:
    """Llama-style parameters on one of `tp` ranks: per layer q (h x h), k and v (G*d x h each, d = h / H) and
    Qwen2's q/k/v biases (h + 2 G d) split by rows, o (h x h) and down (h x ffn) by columns, gate and up (ffn x h
    each) by rows, two RMSNorms (h each, no bias); the embedding and, untied, the output layer (vocab x h each);
    the final RMSNorm (h)."""
    kv = 2 * groups * (h // heads)
    split = h * h + kv * h + h * h + 3 * ffn * h + (h + kv if qkv_bias else 0)
    return layers * (split // tp + 2 * h) + (1 if tied else 2) * vocab * h // tp + h


def by_hand(model: ModelConfig, vocab: int, tp: int = 1) -> int:
    if model.family == "neox":
        return neox_parameters_by_hand(model.num_layers, model.hidden_size, model.ffn_hidden_size, vocab, tp)
    return llama_parameters_by_hand(model.num_layers, model.hidden_size, model.num_attention_heads,
                                    model.num_query_groups, model.ffn_hidden_size, vocab, model.tie_embeddings,
                                    model.family == "qwen2", tp)


# (preset, tensor-parallel degree the vocabulary is padded for); the model itself is built at TP 1.
COUNTED = [(name, 1) for name in PRESETS] + [("neox-10b", 6)]


@pytest.mark.parametrize("preset, tp", COUNTED, ids=[f"{p}-vocab-tp{t}" for p, t in COUNTED])
def test_parameter_formula_equals_the_model_megacpt_builds(world_of_one, preset, tp):
    from megacpt.model.gpt import build_gpt

    model_config = ModelConfig(preset=preset)
    vocab = padded_vocab_size(model_config.vocab_size, tp)
    with torch.device("meta"):  # shapes only: the 10B allocates nothing
        model = build_gpt(model_config, vocab)
    assert sum(p.numel() for p in model.parameters()) == by_hand(model_config, vocab) == parameter_count(model_config,
                                                                                                          vocab)


def test_published_parameter_counts():
    # Pythia-410M: 24 x (12 x 1024^2 + 13 x 1024) + 2 x 50304 x 1024 + 2 x 1024
    assert neox_parameters_by_hand(24, 1024, 4096, 50304) == 405_334_016
    assert parameter_count(ModelConfig(preset="pythia-410m"), 50304) == 405_334_016
    # Ibrahim et al.'s 10B: 36 x (12 x 4608^2 + 13 x 4608) + 2 x 50688 x 4608 + 2 x 4608
    assert neox_parameters_by_hand(36, 4608, 4 * 4608, 50688) == 9_642_249_216
    ten_b = ModelConfig(preset="neox-10b")
    assert padded_vocab_size(ten_b.vocab_size, 6) == padded_vocab_size(ten_b.vocab_size, 4) == 50688
    assert parameter_count(ten_b, padded_vocab_size(ten_b.vocab_size, 6)) == 9_642_249_216
    assert parameters_per_rank(ten_b, 50688, 4) == neox_parameters_by_hand(36, 4608, 4 * 4608, 50688, tp=4)


# The published counts (Hugging Face model cards / safetensors metadata) of the Llama-style presets, with the
# architecture of each written out: layers, hidden, heads, key/value groups, FFN, vocabulary, tied, q/k/v bias.
PUBLISHED = {
    "llama-3.2-1b": (1_235_814_400, (16, 2048, 32, 8, 8192, 128256, True, False)),
    "llama-3.1-8b": (8_030_261_248, (32, 4096, 32, 8, 14336, 128256, False, False)),
    "llama-3.1-70b": (70_553_706_496, (80, 8192, 64, 8, 28672, 128256, False, False)),
    "mistral-7b": (7_241_732_096, (32, 4096, 32, 8, 14336, 32000, False, False)),
    "qwen2.5-0.5b": (494_032_768, (24, 896, 14, 2, 4864, 151936, True, True)),
    "qwen2.5-7b": (7_615_616_512, (28, 3584, 28, 4, 18944, 152064, False, True)),
}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_published_parameter_counts_of_the_llama_style_presets(preset):
    published, dims = PUBLISHED[preset]
    assert llama_parameters_by_hand(*dims) == published
    model = ModelConfig(preset=preset)
    layers, h, heads, groups, ffn, vocab, tied, _ = dims
    assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.num_query_groups,
            model.ffn_hidden_size, model.vocab_size, model.tie_embeddings) == (layers, h, heads, groups, ffn, vocab,
                                                                               tied)
    assert padded_vocab_size(vocab, 1) == vocab  # multiples of 128: nothing padded at TP 1
    assert parameter_count(model, vocab) == published
    assert parameters_per_rank(model, padded_vocab_size(vocab, 8), 8) == by_hand(model, padded_vocab_size(vocab, 8), 8)


def test_flops_per_token_count_a_tied_embedding_as_the_output_matmul():
    """6 x the matmul parameters + 12 L h s: an untied model's input embedding is a lookup and drops out; a tied
    one's single vocabulary matrix is the output layer's matmul and stays."""
    tied = ModelConfig(preset="llama-3.2-1b")
    s, layers, h = tied.seq_length, 16, 2048
    assert flops_per_token(tied, 128256) == 6 * 1_235_814_400 + 12 * layers * h * s
    untied = ModelConfig(preset="llama-3.1-8b")
    assert flops_per_token(untied, 128256) == 6 * (8_030_261_248 - 128256 * 4096) + 12 * 32 * 4096 * untied.seq_length


@pytest.mark.parametrize("stage, weights, grads, optimizer", [
    (0, 1, 1, 1), (1, 1, 1, 16), (2, 1, 16, 16), (3, 16, 16, 16)])
def test_each_zero_stage_partitions_what_it_should_over_data_parallel_ranks(stage, weights, grads, optimizer):
    model = ModelConfig(preset="pythia-410m")
    psi = parameter_count(model, 50304)
    memory = memory_per_gpu(model, Layout(1, 16, stage, 4, False), Precision("bf16", "bf16"))
    assert memory["weights"] == 2 * psi / weights
    assert memory["gradients"] == 2 * psi / grads
    assert memory["optimizer_states"] == OPTIMIZER_BYTES * psi / optimizer
    assert memory["reserved"] == RESERVED_BYTES
    fp32_grads = memory_per_gpu(model, Layout(1, 16, stage, 4, False), Precision("bf16", "fp32"))
    assert fp32_grads["gradients"] == 2 * memory["gradients"]


def test_activations_follow_korthikanti_without_the_attention_matrix():
    model = ModelConfig(preset="neox-10b")  # s 2048, h 4608, 36 layers
    s, h, layers, vocab, tp, b = 2048, 4608, 36, 50688, 4, 3
    layer = s * b * h * (10 + 24 / tp)
    output = s * b * (4 * h + 6 * vocab / tp)
    assert activation_bytes(model, vocab, tp, b, recompute=False) == layers * layer + output
    assert activation_bytes(model, vocab, tp, b, recompute=True) == layers * 2 * s * b * h + layer + output


def test_activations_of_a_swiglu_gqa_layer_count_the_gated_mlp_and_the_smaller_key_value_heads():
    """Llama 3.1 8B at s 8192, micro batch 1, TP 8 (h 4096, 32 heads in 8 key/value groups, F 14336, L 32,
    V 128,256 padded to 129,024), by hand, in bytes per token:
      attention, split by TP: q 2h + k, v 2 x 2h x 8/32 + attention output 2h = 5h = 20,480
      SwiGLU, split by TP: gate, up, silu(gate), their product: 4 x 2F = 114,688
      (GELU's formula gives 24h = 98,304 for the split part, 27% below these 135,168)
      one layer: 10h + 135,168 / 8 = 40,960 + 16,896 = 57,856, x 8192 tokens = 473,956,352
      output: 4h + 6 x 129,024 / 8 = 16,384 + 96,768 = 113,152, x 8192 = 926,941,184
      no recompute: 32 x 473,956,352 + 926,941,184 = 16,093,544,448
      full recompute: 32 x 2 x 8192 x 4096 + 473,956,352 + 926,941,184 = 3,548,381,184"""
    model = ModelConfig(preset="llama-3.1-8b", seq_length=8192)
    assert activation_bytes(model, 129_024, 8, 1, recompute=False) == 16_093_544_448
    assert activation_bytes(model, 129_024, 8, 1, recompute=True) == 3_548_381_184


def test_10b_plan_fits_on_8_nodes_of_8_gpus_with_80_gb(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", TEN_B, "--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gb", "80",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "9,642,249,216" in printed and "fits (limit 72 = 90% of 80)" in printed
    plan = json.loads(out.read_text())
    assert plan["parameters"] == 9_642_249_216
    own, best = plan["config_layout"], plan["recommended"]
    assert own["fits"] and own["memory_gb"]["total"] <= 0.9 * 80
    # The config's layout (TP 4 x DP 16, ZeRO-1, micro batch 3, bf16) by hand: bf16 weights and gradients of a
    # TP rank's share, 16 bytes of optimizer state per parameter over 16 ranks, Korthikanti's activations of 36
    # layers plus the output layer, a 4 GB reserve.
    psi, s, h, b, v = neox_parameters_by_hand(36, 4608, 4 * 4608, 50688, tp=4), 2048, 4608, 3, 50688
    activations = 36 * s * b * h * (10 + 24 / 4) + s * b * (4 * h + 6 * v / 4)
    total = 2 * psi + 2 * psi + 16 * psi / 16 + activations + 4e9
    assert own["memory_gb"]["total"] == pytest.approx(total / 1e9, rel=1e-9)
    # Days: 132,685 steps (300B tokens / (1104 x 2048)) of 6 FLOPs per matmul parameter and token plus attention,
    # on 64 GPUs at 989 TFLOP/s and 40% MFU.
    flops_per_token = 6 * (neox_parameters_by_hand(36, 4608, 4 * 4608, 50688) - v * h) + 12 * 36 * h * s
    days = 132_685 * 1104 * 2048 * flops_per_token / (64 * 989e12 * 0.4) / 86400
    assert own["days"] == pytest.approx(days, rel=1e-9)
    assert own["layout"] == best["layout"] == {"tensor": 4, "data": 16, "zero_stage": 1,
                                               "micro_batch": 3, "activation_checkpointing": False}
    assert 1 <= own["largest_micro_batch"]


LLAMA_8B = str(REPO / "configs" / "llama31_8b_cpt_replay.json")


@pytest.mark.parametrize("preset", PUBLISHED)
def test_every_llama_style_preset_gets_a_plan_that_fits_on_8_nodes(preset, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", LLAMA_8B, "--set", f"model={{\"preset\": \"{preset}\"}}", "--set", "parallel.tensor=1",
                 "--nodes", "8", "--gpus-per-node", "8", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["parameters"] == PUBLISHED[preset][0]
    best = plan["recommended"]
    assert best["fits"] and best["memory_gb"]["total"] <= 0.9 * 80
    model = ModelConfig(preset=preset)
    assert model.num_query_groups % best["layout"]["tensor"] == 0  # whole key/value groups per rank
    assert f"({model.family})" in capsys.readouterr().out


def test_70b_says_what_it_needs(capsys):
    """On one node of 8 x 80 GB nothing fits (tensor parallelism stops at the node, no pipeline parallelism); on
    eight it trains at TP 8 x DP 8 with ZeRO-1 and recompute."""
    args = ["plan", LLAMA_8B, "--set", 'model={"preset": "llama-3.1-70b"}', "--set", "parallel.tensor=8"]
    assert main([*args, "--nodes", "1", "--gpus-per-node", "8"]) == 2
    err = capsys.readouterr().err
    assert "no layout fits in 80 GB per GPU on 1 node x 8 GPUs" in err and "no pipeline parallelism" in err
    assert main([*args, "--nodes", "8", "--gpus-per-node", "8"]) == 0
    printed = capsys.readouterr().out
    assert "llama-3.1-70b (llama): 80 layers" in printed and "(8 key/value groups)" in printed
    assert "recommended: TP 8 x DP 8, ZeRO-1, micro batch 1, activation checkpointing on" in printed


def test_smaller_gpus_get_a_layout_that_fits_them():
    config = load_config(TEN_B)
    roomy = recommend(config, Cluster(nodes=2, gpus_per_node=8, gpu_memory_gb=80))
    tight = recommend(config, Cluster(nodes=2, gpus_per_node=8, gpu_memory_gb=40))
    assert roomy.total_bytes > 0.9 * 40 * GB >= tight.total_bytes
    assert tight.layout.tensor > roomy.layout.tensor


def test_hostfile_gives_the_cluster(tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8\n")
    assert main(["plan", TEN_B, "--hostfile", str(hostfile)]) == 0
    assert "2 nodes x 8 GPUs = 16" in capsys.readouterr().out


def test_cpu_processes_get_the_layout_checks_and_no_gpu_figures(tmp_path, capsys):
    """--cpu (the SLURM preflight on a partition without GPUs): the config's layout is checked and shown, in
    fp32, with nothing about GPUs, their memory or their FLOPs; a world the batch does not divide is exit 2."""
    out = tmp_path / "plan.json"
    assert main(["plan", TEN_B, "--nodes", "2", "--gpus-per-node", "8", "--cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cluster      2 nodes x 8 CPU processes = 16\n" in printed
    assert "layout: TP 4 x DP 4, ZeRO-1, micro batch 3" in printed and "fp32 weights" in printed
    for word in ("GPU", " GB", "TFLOP", "days"):
        assert word not in printed
    plan = json.loads(out.read_text())
    assert plan["parameters"] == 9_642_249_216 and plan["cluster"]["cpu"]
    assert plan["config_layout"]["layout"]["data"] == 4
    assert main(["plan", TEN_B, "--nodes", "1", "--gpus-per-node", "6", "--cpu"]) == 2
    assert "world size 6 (1 node x 6 CPU processes) is not divisible by parallel.tensor 4" in capsys.readouterr().err
    assert main(["plan", TEN_B, "--cpu", "--gpu-memory-gb", "40"]) == 2
    assert "--gpu-memory-gb describes a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("hostfile_text, args, words", [
    ("node-a slots=8\nnode-b slots=0\n", [], ["line 2", "node-b slots=0", "at least one slot"]),
    ("node-a slots=8\nnode-b slots=4\n", [], ["different slot counts [4, 8]"]),
    ("node-a slots=8\nnode-a slots=8\n", [], ["listed twice"]),
    ("node-a 8\n", [], ["line 1", "expected 'HOSTNAME slots=N'"]),
    (None, ["--nodes", "1", "--gpus-per-node", "6"], ["world size 6", "not divisible by parallel.tensor 4",
                                                      "recommends TP"]),
    (None, ["--nodes", "1", "--gpus-per-node", "1"],
     ["no layout fits in 80 GB per GPU on 1 node x 1 GPUs", "above the 72 GB limit"]),
    (None, ["--nodes", "8", "--set", "train.global_batch_size=1103", "--set", "train.micro_batch_size=1"],
     ["no layout of 8 nodes x 8 GPUs can run this config", "1103"]),
    (None, ["--set", "parallel.pipeline=4"], ["parallel.pipeline > 1 is not supported", "parallel.tensor and ZeRO"]),
    (None, ["--set", 'deepspeed.zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}}'],
     ["deepspeed.zero_optimization.offload_param", "offload"]),
])
def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path, capsys, hostfile_text, args, words):
    if hostfile_text is not None:
        (tmp_path / "hostfile").write_text(hostfile_text)
        args = ["--hostfile", str(tmp_path / "hostfile")]
    assert main(["plan", TEN_B, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err
