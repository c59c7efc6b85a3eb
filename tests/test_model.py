"""The model itself: megacpt's layer spec computes what megatron-core's reference modules compute."""
import torch

from megacpt.config import ModelConfig
from megacpt.model import gpt, neox
from megacpt.model.gpt import build_gpt

MODEL = ModelConfig(preset="tiny", num_layers=3)
IDS = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
POSITIONS = torch.arange(64).unsqueeze(0).expand(2, -1)
CAUSAL = torch.triu(torch.ones(64, 64, dtype=torch.bool), diagonal=1)[None, None]  # True = masked


def build_pair(monkeypatch, swap) -> tuple[torch.nn.Module, torch.nn.Module]:
    """megacpt's model, and the same weights with `swap(spec)` putting megatron's own modules back."""
    torch.manual_seed(0)
    ours = build_gpt(MODEL, 256)
    reference_spec = gpt.layer_spec(MODEL)
    swap(reference_spec.submodules)
    monkeypatch.setattr(gpt, "layer_spec", lambda model: reference_spec)
    reference = build_gpt(MODEL, 256)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def test_sdpa_attention_matches_megatrons_reference_attention(world, monkeypatch):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    def swap(submodules):
        submodules.self_attention.submodules.core_attention = DotProductAttention

    sdpa, reference = build_pair(monkeypatch, swap)
    assert isinstance(reference.decoder.layers[0].self_attention.core_attention, DotProductAttention)
    with torch.no_grad():
        ours = sdpa.eval()(IDS, POSITIONS, None)
        theirs = reference.eval()(IDS, POSITIONS, CAUSAL)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_plain_linears_give_megatrons_logits_and_gradients(world, monkeypatch):
    """At TP 1 the block's linears run as F.linear; logits and every parameter's gradient are megatron's."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    def swap(submodules):
        attention, mlp = submodules.self_attention.submodules, submodules.mlp.submodules
        attention.linear_qkv, attention.linear_proj = ColumnParallelLinear, RowParallelLinear
        mlp.linear_fc1, mlp.linear_fc2 = ColumnParallelLinear, RowParallelLinear

    ours, reference = build_pair(monkeypatch, swap)
    assert type(reference.decoder.layers[0].mlp.linear_fc1) is ColumnParallelLinear
    assert isinstance(ours.decoder.layers[0].mlp.linear_fc1, neox.NeoXColumnParallelLinear)
    labels = torch.roll(IDS, -1, dims=1)
    losses = [model.train()(IDS, POSITIONS, None, labels=labels).mean() for model in (ours, reference)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) <= 1e-6
    grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.allclose(param.grad, grads[name].grad, atol=1e-6, rtol=1e-5), name


def test_first_engine_step_is_clipped_adamw_by_the_formula(world):
    """The CPU engine (fused torch AdamW, no data-parallel reduction) moves every weight by AdamW's first
    step on the clipped gradient: p * (1 - lr * wd) - lr * g / (|g| + eps), with decay on matrices only."""
    from megacpt.config import RunConfig, padded_vocab_size
    from megacpt.runtime.distributed import MegatronMPU
    from megacpt.runtime.engine import deepspeed_config, initialize
    from megacpt.schedule import StageScheduler

    lr = 1e-3
    config = RunConfig.model_validate({
        "run_dir": "/tmp/unused", "model": MODEL.model_dump(),
        "data": {"sources": [{"name": "x", "prefix": "unused"}]},
        "schedule": {"style": "constant", "max_lr": lr},
        "train": {"steps": 10, "global_batch_size": 2, "micro_batch_size": 2},
    })
    torch.manual_seed(0)
    model = build_gpt(config.model, padded_vocab_size(MODEL.vocab_size, 1))
    ds = deepspeed_config(config, 1)
    weight_decay, eps, max_norm = ds["optimizer"]["params"]["weight_decay"], ds["optimizer"]["params"]["eps"], \
        ds["gradient_clipping"]
    engine, optimizer, _ = initialize(model, ds, lambda opt: StageScheduler(opt, config.schedule, 10), MegatronMPU)
    assert optimizer.defaults["fused"] and not engine.enable_backward_allreduce
    loss = engine(IDS, POSITIONS, None, labels=torch.roll(IDS, -1, dims=1)).mean()
    engine.backward(loss)
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in engine.module.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for _, g in before.values()))
    clip = min(1.0, max_norm / (norm.item() + 1e-6))
    engine.step()
    for name, param in engine.module.named_parameters():
        p0, g = before[name][0].double(), before[name][1].double() * clip
        decay = weight_decay if p0.ndim >= 2 else 0.0
        expected = p0 * (1 - lr * decay) - lr * g / (g.abs() + eps)
        assert torch.allclose(param.detach().double(), expected, atol=1e-6, rtol=0), name


def test_optimizer_offload_keeps_deepspeeds_cpu_adam():
    """torch's fused AdamW is the default, except where ZeRO offloads the optimizer to DeepSpeed's CPU Adam."""
    from megacpt.config import RunConfig
    from megacpt.runtime.deepspeed_config import derived_deepspeed_config

    def optimizer_params(deepspeed: dict) -> dict:
        config = RunConfig.model_validate({
            "run_dir": "/tmp/unused", "model": MODEL.model_dump(), "data": {"sources": [{"name": "x", "prefix": "x"}]},
            "schedule": {"style": "constant", "max_lr": 1e-3}, "deepspeed": deepspeed,
            "train": {"steps": 10, "global_batch_size": 2, "micro_batch_size": 2}})
        return derived_deepspeed_config(config, 1)["optimizer"]["params"]

    assert optimizer_params({})["torch_adam"] and optimizer_params({})["fused"]
    offloaded = optimizer_params({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    assert "torch_adam" not in offloaded and "fused" not in offloaded
    not_offloaded = optimizer_params({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}})
    assert not_offloaded["torch_adam"]


def test_hidden_dropout_in_train_mode_is_hugging_faces(world):
    """With hidden dropout on, megacpt's block drops the attention and the MLP branch separately, as Hugging
    Face's GPT-NeoX does: from the same RNG state both give the same train-mode logits. (Batch 1, so the
    [b, s, h] and [s, b, h] masks are drawn in the same order; attention dropout off, as megatron draws it from
    its own RNG tracker.)"""
    from megacpt.model import hf_mapping
    from megacpt.weights.checkpoint_io import module_state

    from hfmodel import random_gpt_neox

    hf = random_gpt_neox(0, vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=256, rotary_pct=0.25, max_position_embeddings=64, hidden_dropout=0.2,
                         attention_dropout=0.0, use_parallel_residual=True, tie_word_embeddings=False)
    ours = build_gpt(MODEL.model_copy(update={"dropout": 0.2}), 256)
    ours.load_state_dict(module_state(hf_mapping.hf_to_megatron(hf.state_dict(), MODEL, 256)), strict=True)
    for layer in ours.decoder.layers:
        layer.self_attention.core_attention.dropout = 0.0
    ids, positions = IDS[:1], POSITIONS[:1]
    with torch.no_grad():
        torch.manual_seed(5)
        theirs = hf.train()(ids).logits
        torch.manual_seed(5)
        mine = ours.train()(ids, positions, None)
        without_dropout = ours.eval()(ids, positions, None)
    assert (mine - theirs).abs().max().item() <= 1e-4
    assert (mine - without_dropout).abs().max().item() > 0.1  # dropout did act
