"""The model families megacpt builds, as the few choices that tell them apart.

Every family is a megatron-core GPTModel with megacpt's SDPA core attention (model/neox.py); a family only
picks the norm, the biases, the MLP and the residual wiring, and names its Hugging Face class. Llama-style
families (Llama 2 / 3.x, Mistral, Qwen2 / 2.5) share one layout: pre-norm sequential blocks, RMSNorm, a SwiGLU
MLP, grouped-query attention and full-dimension RoPE, without biases (Qwen2: biases on q, k and v only).
This module imports neither torch nor transformers, so the config can validate against it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What one family's layers are made of, in megatron-core's terms."""

    name: str
    normalization: str  # megatron-core TransformerConfig.normalization: "LayerNorm" or "RMSNorm"
    linear_bias: bool  # biases on every linear (add_bias_linear)
    qkv_bias: bool  # biases on the query/key/value projection (add_qkv_bias)
    gated_mlp: bool  # SwiGLU: down(silu(gate x) * up x) (gated_linear_unit with silu)
    hf_model_type: str  # config.json's model_type
    hf_architecture: str  # the transformers class that holds it

    @property
    def llama_layout(self) -> bool:
        """Pre-norm sequential blocks, RMSNorm, SwiGLU, full RoPE, grouped-query attention."""
        return self.name != "neox"


FAMILIES: dict[str, Family] = {
    "neox": Family("neox", "LayerNorm", True, True, False, "gpt_neox", "GPTNeoXForCausalLM"),
    "llama": Family("llama", "RMSNorm", False, False, True, "llama", "LlamaForCausalLM"),
    "mistral": Family("mistral", "RMSNorm", False, False, True, "mistral", "MistralForCausalLM"),
    "qwen2": Family("qwen2", "RMSNorm", False, True, True, "qwen2", "Qwen2ForCausalLM"),
}


def family_of_hf_model_type(model_type: str | None) -> Family | None:
    """The family whose Hugging Face config.json says `model_type`, or None."""
    return next((f for f in FAMILIES.values() if f.hf_model_type == model_type), None)
