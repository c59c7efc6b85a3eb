"""The model itself: megacpt's SDPA core attention computes what megatron-core's reference attention does."""
import torch

from megacpt.config import ModelConfig
from megacpt.model.neox import build_gpt_neox


def test_sdpa_attention_matches_megatrons_reference_attention(world, monkeypatch):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megacpt.model import neox

    model_cfg = ModelConfig(preset="tiny", num_layers=3)
    torch.manual_seed(0)
    sdpa = build_gpt_neox(model_cfg, 256).eval()

    reference_spec = neox.neox_layer_spec()
    reference_spec.submodules.self_attention.submodules.core_attention = DotProductAttention
    monkeypatch.setattr(neox, "neox_layer_spec", lambda parallel_residual=True: reference_spec)
    reference = build_gpt_neox(model_cfg, 256).eval()
    assert isinstance(reference.decoder.layers[0].self_attention.core_attention, DotProductAttention)
    reference.load_state_dict(sdpa.state_dict())

    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(64).unsqueeze(0).expand(2, -1)
    causal = torch.triu(torch.ones(64, 64, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with torch.no_grad():
        ours = sdpa(ids, positions, None)
        theirs = reference(ids, positions, causal)
    assert (ours - theirs).abs().max().item() <= 1e-5
