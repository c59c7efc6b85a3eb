"""Run under the deepspeed launcher (or alone): load an HF GPT-NeoX dir into megacpt's model at the world's
TP degree (strictly: every weight mapped, none left over) and write the max |logit difference| to OUT
(rank 0). Used by tests/test_parallel.py."""
import json
import sys

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from transformers import GPTNeoXForCausalLM

from megacpt.config import ModelConfig, padded_vocab_size
from megacpt.distributed import setup_world
from megacpt.model import hf_mapping
from megacpt.model.neox import build_gpt_neox
from megacpt.tools.checkpoint_io import module_state


def main(hf_dir: str, tp: int, out: str) -> None:
    world = setup_world(tp, seed=0)
    hf = GPTNeoXForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    c = hf.config
    model_cfg = ModelConfig(**hf_mapping.model_fields_from_hf(c.to_dict()))
    padded = padded_vocab_size(c.vocab_size, tp)
    model = build_gpt_neox(model_cfg, padded, tp).eval()
    mapped = {hf_name for _, hf_name in hf_mapping.name_pairs(c.num_hidden_layers)}
    unmapped = {name.replace("lm_head.", "embed_out.") for name, _ in hf.named_parameters()} - mapped  # 5.x name
    assert not unmapped, f"Hugging Face parameters the mapping leaves out: {sorted(unmapped)}"
    full = hf_mapping.hf_to_megatron(hf.state_dict(), c.num_hidden_layers, padded)
    model.load_state_dict(module_state(hf_mapping.split_for_rank(full, tp, world.tensor_rank)), strict=True)
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
