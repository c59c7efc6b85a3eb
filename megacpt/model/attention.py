"""The attention mask of document masking, for every model family.

Under `data.document_mask` a packed sample carries the number of the document each token belongs to; the
mask built here lets a token attend only to earlier tokens of its own document. It is megatron's attention
mask (True where attention is *not* allowed, [batch, 1, seq, seq]), passed as `GPTModel`'s `attention_mask`,
so it reaches the core attention of whichever layer spec the family uses (megacpt's SDPA core attention,
`model.neox.SDPAttention`, hands it to `scaled_dot_product_attention`).

Which kernel runs it: PyTorch's SDPA with a boolean mask. On CPU that is its fused flash-attention CPU kernel
(it takes a mask); on CUDA the memory-efficient kernel (the flash kernel takes no arbitrary mask). Without
document masking no mask is built and SDPA runs causal (`is_causal`), flash on CUDA.
"""
from __future__ import annotations

import torch


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [b, 1, s, s] (True = masked) from per-token document numbers [b, s]."""
    seq = document_ids.shape[-1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return ~(same & causal).unsqueeze(1)
