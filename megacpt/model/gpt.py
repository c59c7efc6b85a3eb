"""Every family's model as megatron-core's `GPTModel`: one layer spec, one TransformerConfig, one builder.

The family (model/families.py) decides the norm (LayerNorm or RMSNorm), the biases, the MLP (GELU, or
SwiGLU through megatron's `gated_linear_unit`), the residual wiring (NeoX's parallel block or megatron's own
sequential `TransformerLayer`), grouped-query attention (`num_query_groups`) and tied embeddings
(`share_embeddings_and_output_weights`); RoPE, its Llama 3 scaling, YaRN and tensor parallelism are
megatron-core's.
The modules megacpt puts into the spec (SDPA core attention, plain-matmul linears) are the same for every
family, so a change to attention applies to all of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings import YarnRotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megacpt.config import ModelConfig, RopeScalingConfig
from megacpt.model.families import FAMILIES
from megacpt.model.neox import (
    NeoXColumnParallelLinear,
    NeoXMLPInputLinear,
    NeoXRowParallelLinear,
    NeoXTransformerLayer,
    SDPAttention,
)


def layer_spec(model: ModelConfig) -> ModuleSpec:
    """megatron-core's local GPT spec with SDPA core attention, plain-matmul linears, the family's norm and,
    for NeoX, the parallel-residual layer."""
    family = FAMILIES[model.family]
    spec = get_gpt_layer_local_spec(normalization=family.normalization)
    attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    attention.core_attention = SDPAttention
    attention.linear_qkv, attention.linear_proj = NeoXColumnParallelLinear, NeoXRowParallelLinear
    mlp.linear_fc1, mlp.linear_fc2 = NeoXMLPInputLinear, NeoXRowParallelLinear
    if model.parallel_residual:
        spec.module = NeoXTransformerLayer
    return spec


def transformer_config(model: ModelConfig, tensor_parallel_size: int, *, params_dtype: torch.dtype,
                       activation_checkpointing: bool, cpu_init: bool) -> TransformerConfig:
    """megatron-core's TransformerConfig for the model's family and dimensions (NeoX: exact GELU, biases,
    LayerNorm; Llama-style: SwiGLU, no biases but Qwen2's q/k/v ones, RMSNorm, grouped-query attention)."""
    family = FAMILIES[model.family]
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if activation_checkpointing else {}
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        hidden_dropout=model.dropout,
        attention_dropout=model.dropout,
        layernorm_epsilon=model.layernorm_eps,
        normalization=family.normalization,
        add_bias_linear=family.linear_bias,
        add_qkv_bias=family.qkv_bias,
        gated_linear_unit=family.gated_mlp,
        activation_func=F.silu if family.gated_mlp else F.gelu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        init_method_std=model.init_std,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=False,
        use_cpu_initialization=cpu_init,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        **recompute,
    )


def build_gpt(model: ModelConfig, padded_vocab_size: int, tensor_parallel_size: int = 1, *,
              params_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False,
              cpu_init: bool = True) -> GPTModel:
    """Build this rank's shard of the model. Needs megatron's parallel state to be initialised.

    With `cpu_init` every tensor-parallel rank draws the full weight from the same seed and keeps its slice,
    so the model is the same whatever the TP degree.
    """
    config = transformer_config(model, tensor_parallel_size, params_dtype=params_dtype,
                                activation_checkpointing=activation_checkpointing, cpu_init=cpu_init)
    scaling = model.rope_scaling
    yarn = scaling is not None and scaling.rope_type == "yarn"
    if yarn:
        set_yarn(config, scaling)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model),
        vocab_size=padded_vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="yarn" if yarn else "rope",
        rotary_percent=model.rotary_pct,
        rotary_base=model.rotary_base,
        rope_scaling=scaling is not None and scaling.rope_type == "llama3",
        rope_scaling_factor=scaling.factor if scaling is not None else 8.0,
        seq_len_interpolation_factor=scaling.factor if scaling is not None and scaling.rope_type == "linear" else None,
    )
    if yarn and model.rotary_pct < 1:
        # megatron-core's YarnRotaryEmbedding spans the whole head whatever rotary_percent: give it the rotated part
        gpt.rotary_pos_emb = YarnRotaryEmbedding(
            kv_channels=int(model.head_dim * model.rotary_pct), rotary_base=model.rotary_base,
            scaling_factor=scaling.factor, original_max_position_embeddings=scaling.original_max_position_embeddings,
            beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, mscale=None, mscale_all_dim=None,
            use_cpu_initialization=config.use_cpu_initialization)
    return gpt


def set_yarn(config: TransformerConfig, scaling: RopeScalingConfig) -> None:
    """YaRN where megatron-core reads it: GPTModel builds its YarnRotaryEmbedding from these attributes of the
    config, and attention multiplies the rotated query and key by the concentration factor when the config
    has `yarn_rotary_scaling_factor`: 0.1 ln(factor) + 1 with mscale None, Hugging Face's attention_factor."""
    config.yarn_rotary_scaling_factor = scaling.factor
    config.yarn_original_max_position_embeddings = scaling.original_max_position_embeddings
    config.yarn_beta_fast, config.yarn_beta_slow = scaling.beta_fast, scaling.beta_slow
    config.yarn_mscale = config.yarn_mscale_all_dim = None
    config.yarn_correction_range_round_to_int = True  # Hugging Face's `truncate`, on by default
