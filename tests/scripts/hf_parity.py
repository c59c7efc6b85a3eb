"""Run under the deepspeed launcher (or alone): load an HF model dir of any family into megacpt's model at the world's
TP degree (strictly: every weight mapped, none left over) and write the max |logit difference| to OUT
(rank 0). Used by tests/test_parallel.py."""
import json
import sys

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from transformers import AutoModelForCausalLM

from megacpt.config import ModelConfig, padded_vocab_size
from megacpt.model import hf_mapping
from megacpt.model.gpt import build_gpt
from megacpt.runtime.distributed import setup_world
from megacpt.weights.checkpoint_io import module_state


def main(hf_dir: str, tp: int, out: str) -> None:
    world = setup_world(tp, seed=0)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    c = hf.config
    model_cfg = ModelConfig(**hf_mapping.model_fields_from_hf(c.to_dict()))
    padded = padded_vocab_size(c.vocab_size, tp)
    model = build_gpt(model_cfg, padded, tp).eval()
    unmapped = {name for name, _ in hf.named_parameters()} - hf_mapping.hf_names(model_cfg)
    assert not unmapped, f"Hugging Face parameters the mapping leaves out: {sorted(unmapped)}"
    full = hf_mapping.hf_to_megatron(hf.state_dict(), model_cfg, padded)
    shard = hf_mapping.split_for_rank(full, tp, world.tensor_rank, gated_mlp=hf_mapping.gated_mlp(model_cfg))
    model.load_state_dict(module_state(shard), strict=True)
    ids = torch.randint(0, c.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        logits = model(ids, pos, None)  # [b, s, vocab / tp]
        logits = gather_from_tensor_model_parallel_region(logits.transpose(0, 1).contiguous()).transpose(0, 1)
    diff = (logits[..., : c.vocab_size] - ref).abs().max().item()
    if world.is_main:
        with open(out, "w") as f:
            json.dump({"max_abs_diff": diff, "tp": tp}, f)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], int(args[1]), args[2])
