"""The modules megacpt puts into megatron-core's layer spec: SDPA core attention, plain-matmul linears and
GPT-NeoX's parallel-residual block. Every family uses the first two (model/gpt.py builds the spec).

megatron-core has no parallel residual, so the NeoX block is a `TransformerLayer` subclass that feeds the
same input to both branches: `x + attn(ln1(x)) + mlp(ln2(x))`. Everything else (QKV/proj/MLP linears with
bias, LayerNorm with bias, partial rotary, untied embeddings, tensor parallelism, recompute) is megatron-core's
own. Core attention is PyTorch's `scaled_dot_product_attention` with `is_causal`, which avoids megatron's
materialised mask and picks flash/memory-efficient kernels where the device has them; under document masking
it takes the block-diagonal mask of `model.attention` instead. Grouped-query attention repeats each key/value
head for its group of query heads first. The linears are megatron's tensor-parallel ones, whose local matmul
runs as a plain `F.linear` (bias fused) wherever it needs no communication inside autograd (BENCHMARKS.md has
what each of these choices is worth).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer


class SDPAttention(MegatronModule):
    """Causal core attention through `torch.nn.functional.scaled_dot_product_attention`.

    Takes megatron's [seq, batch, heads, head_dim] query/key/value of this tensor-parallel rank's heads and
    returns [seq, batch, heads * head_dim]. With grouped-query attention key and value hold one head per group
    of query heads (consecutive query heads share one), as megatron's own core attention expects them.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        seq, batch = query.shape[0], query.shape[1]
        # [b, h, s, d] made contiguous: SDPA's CPU kernels run ~6% faster on it than on the strided view.
        q, k, v = (x.permute(1, 2, 0, 3).contiguous() for x in (query, key, value))
        # megatron masks are True where attention is *not* allowed; SDPA's boolean masks are the opposite.
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.dropout if self.training else 0.0
        grouped = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=mask is None, scale=self.softmax_scale, **grouped)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


class _LocalMatmulAsPlainLinear:
    """Runs a tensor-parallel linear's matmul as `F.linear` when it needs no communication inside autograd.

    megatron's custom autograd function exists to overlap the input-gradient all-reduce (column-parallel
    at TP > 1) and for fused gradient accumulation; without those it computes exactly `F.linear`, but adds
    its bias in a separate kernel and runs its backward in Python. Everything else in the call (gathers,
    reductions, bias handling) stays megatron's.
    """

    def _forward_impl(self, input, weight, bias, *, allreduce_dgrad, sequence_parallel,
                      gradient_accumulation_fusion, grad_output_buffer=None, **kwargs):
        if allreduce_dgrad or sequence_parallel or gradient_accumulation_fusion or grad_output_buffer is not None:
            return super()._forward_impl(input, weight, bias, allreduce_dgrad=allreduce_dgrad,
                                         sequence_parallel=sequence_parallel,
                                         gradient_accumulation_fusion=gradient_accumulation_fusion,
                                         grad_output_buffer=grad_output_buffer, **kwargs)
        return F.linear(input, weight, bias)


class NeoXColumnParallelLinear(_LocalMatmulAsPlainLinear, tensor_parallel.ColumnParallelLinear):
    """megatron's ColumnParallelLinear; at TP 1 its matmul is a plain `F.linear`."""


class NeoXMLPInputLinear(NeoXColumnParallelLinear):
    """The MLP's first linear, with its bias added inside the matmul.

    megatron's MLP asks this linear to hand its bias back so that a fused bias-GELU kernel can add it; that
    kernel is the tanh approximation, not NeoX's exact GELU, so megacpt runs the MLP unfused, where the MLP
    would only add the bias itself as a separate pass over the [s, b, 4h] activations.
    """

    def __init__(self, *args, skip_bias_add: bool, **kwargs):
        super().__init__(*args, skip_bias_add=False, **kwargs)


class NeoXRowParallelLinear(_LocalMatmulAsPlainLinear, tensor_parallel.RowParallelLinear):
    """megatron's RowParallelLinear; its local matmul is a plain `F.linear`, the reduction stays megatron's."""


class NeoXTransformerLayer(TransformerLayer):
    """The GPT-NeoX block: attention and MLP read the same input, both outputs join the residual, each after
    its own hidden dropout."""

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, padding_mask=None, **kwargs):
        attn_out, attn_bias = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        if self.training and self.hidden_dropout > 0:
            # Hugging Face's GPT-NeoX drops each branch on its own (attention's mask drawn first), so with
            # dropout on both models train alike; a mask on the sum would drop both branches together.
            attn_out, mlp_out = (F.dropout(out if bias is None else out + bias, p=self.hidden_dropout)
                                 for out, bias in ((attn_out, attn_bias), (mlp_out, mlp_bias)))
            return hidden_states + attn_out + mlp_out, context
        branches = attn_out + mlp_out
        if attn_bias is not None and mlp_bias is not None:  # the two [h] biases summed first: one pass over the
            branches = branches + BiasSum.apply(attn_bias, mlp_bias)  # activations instead of two
        elif attn_bias is not None or mlp_bias is not None:
            branches = branches + (attn_bias if mlp_bias is None else mlp_bias)
        return hidden_states + branches, context


class BiasSum(torch.autograd.Function):
    """`a + b`, whose backward gives each input its own gradient tensor.

    A plain sum's backward hands one tensor to both inputs. Eager autograd copies it before keeping it as a
    parameter's `.grad`, but a compiled backward (`train.compile`) keeps that one tensor as both parameters'
    `.grad`: gradient clipping would then scale it twice and the next micro-batch add into it twice.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.clone()
