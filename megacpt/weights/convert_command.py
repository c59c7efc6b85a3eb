"""`megacpt convert hf-to-megacpt | megacpt-to-hf`: Hugging Face <-> megacpt checkpoints, verified.

The families are GPT-NeoX (`GPTNeoXForCausalLM`), Llama (`LlamaForCausalLM`), Mistral (`MistralForCausalLM`)
and Qwen2 (`Qwen2ForCausalLM`); config.json's `model_type` says which.

Tensors go through model/hf_mapping.py (the one weight mapping), megacpt tags through checkpoint_io.py,
and `transformers` reads and writes the Hugging Face side (safetensors or .bin, sharded or not). Each
direction then runs the converted and the source model on the same random batch and fails with exit code 1
when their logits differ by more than the threshold: a conversion that silently changes the model is worse
than none. Training state (optimizer, schedule, data position) is never converted.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

from megacpt.cli_helpers import positive_int
from megacpt.config import ModelConfig, ParallelConfig, TokenizerConfig, padded_vocab_size
from megacpt.errors import UserError
from megacpt.model import hf_mapping
from megacpt.model.families import FAMILIES, Family, family_of_hf_model_type
from megacpt.policy.stages import CheckpointState, ImportedStage, ModelSignature, SavedConfig
from megacpt.weights import checkpoint_io

DEFAULT_THRESHOLD = 1e-4
VERIFY_BATCH = (2, 64)  # sequences x tokens (fewer tokens when the model's seq_length is shorter)


class VerificationFailed(Exception):
    """The converted model computes different logits from the source model."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    directions = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_megacpt = directions.add_parser("hf-to-megacpt",
                                       help="a Hugging Face GPT-NeoX, Llama, Mistral or Qwen2 folder -> a "
                                            "weights-only megacpt checkpoint")
    to_megacpt.add_argument("--hf", required=True, metavar="DIR",
                            help="local folder with config.json and the weights (safetensors or .bin, sharded or not)")
    checkpoint_io.add_output_arguments(to_megacpt,
                                       "checkpoints folder (one tag and `latest`, as init.checkpoint takes it)")
    to_megacpt.add_argument("--tp", type=positive_int, default=1, metavar="N",
                            help="tensor-parallel degree to split for (default 1)")
    to_hf = directions.add_parser("megacpt-to-hf",
                                  help="a megacpt checkpoint -> a folder the family's transformers class "
                                       "(e.g. LlamaForCausalLM) loads with from_pretrained")
    to_hf.add_argument("--checkpoint", required=True, metavar="DIR",
                       help="a checkpoints folder (its `latest`) or one tag folder")
    checkpoint_io.add_output_arguments(to_hf, "Hugging Face folder")
    for command in (to_megacpt, to_hf):
        command.add_argument("--no-verify", dest="verify", action="store_false", help="skip the logit comparison")
        command.add_argument("--verify-device", choices=("cpu", "cuda"), default=None,
                             help="where to run the comparison: the machine's device by default (cuda when present)")
        command.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                             help=f"largest allowed max |logit difference| in float32 (default {DEFAULT_THRESHOLD})")


def run(args: argparse.Namespace) -> int:
    quiet_transformers()
    device = verify_device(args.verify_device) if args.verify else None
    try:
        if args.direction == "hf-to-megacpt":
            diff = hf_to_megacpt(Path(args.hf), Path(args.output), args.tp, args.overwrite, device, args.threshold)
        else:
            diff = megacpt_to_hf(Path(args.checkpoint), Path(args.output), args.overwrite, device, args.threshold)
    except VerificationFailed as e:
        print(f"megacpt convert: verification failed, nothing written: {e}", file=sys.stderr)
        return 1
    verdict = ("not verified (--no-verify)" if diff is None
               else f"verified: max |logit difference| {diff:.3e} <= {args.threshold:g}")
    print(f"wrote {args.output} ({verdict})")
    return 0


# ------------------------------------------------------------------------------------ the two directions


def hf_to_megacpt(hf_dir: Path, output: Path, tp: int, overwrite: bool, device: torch.device | None,
                  threshold: float) -> float | None:
    """Write a weights-only megacpt checkpoint of an HF folder; returns the verified logit difference."""
    model = model_config_from_hf(read_hf_config(hf_dir), hf_dir)
    checkpoint_io.check_tensor_parallel(model, tp)
    with checkpoint_io.staged_output(output, overwrite, [hf_dir]) as staging:
        hf = load_hf(hf_dir, FAMILIES[model.family], dtype="auto")
        weights = hf_mapping.hf_to_megatron(hf.state_dict(), model, padded_vocab_size(model.vocab_size, tp))
        tag_dir = checkpoint_io.write(staging, weights, import_state(hf_dir, model, tp), output)
        if device is None:
            return None
        written = checkpoint_io.read_weights(tag_dir, model, tp)  # verify what is on disk, split and merged again
        return check_logits(hf, written, model, device, threshold)


def import_state(hf_dir: Path, model: ModelConfig, tp: int) -> CheckpointState:
    """megacpt state of an imported model: weights only, untrained by megacpt (step 0), one stage naming the
    HF folder, no schedule or data position."""
    hf_dir = hf_dir.resolve()
    tokenizer = hf_dir / "tokenizer.json"
    return CheckpointState(
        step=0, tokens=0, config=SavedConfig(model=model, parallel=ParallelConfig(tensor=tp)),
        model=ModelSignature.of(model, tp),
        tokenizer=TokenizerConfig(type="hf", path=str(tokenizer)) if tokenizer.is_file() else None,
        has_optimizer=False, stages=[ImportedStage(index=0, name=hf_dir.name, path=str(hf_dir))],
        scheduler=None, data=None)


def megacpt_to_hf(path: Path, output: Path, overwrite: bool, device: torch.device | None,
                  threshold: float) -> float | None:
    """Write an HF folder of the model's family (padding rows removed, tokenizer copied) from any megacpt
    checkpoint."""
    with checkpoint_io.staged_output(output, overwrite, [path]) as staging:
        source = checkpoint_io.load(path)
        model = source.model
        family = FAMILIES[model.family]
        section = source.state.tokenizer
        hf_state = hf_mapping.megatron_to_hf(source.weights, model)
        tokenizer = checkpoint_io.checkpoint_tokenizer(source.state)
        save_hf(staging, hf_state, hf_config(model, tokenizer.eod_id if tokenizer else None), family)
        if section is not None and section.type == "hf":
            for name, file in checkpoint_io.tokenizer_files(section).items():
                shutil.copyfile(file, staging / name)
        elif section is not None and section.type == "sentencepiece":
            save_sentencepiece_as_hf(Path(section.model), staging)
        elif section is not None:
            print(f"note: the checkpoint's {section.type} tokenizer has no Hugging Face form; no tokenizer written")
        if device is None:
            return None
        converted = hf_class(family).from_pretrained(staging, dtype=torch.float32)
        return check_logits(converted, source.weights, model, device, threshold)


# ------------------------------------------------------------------------------------ the Hugging Face side


def quiet_transformers() -> None:
    """No progress bars or load reports: megacpt reports problems itself."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def read_hf_config(hf_dir: Path) -> dict:
    """config.json of a model of a known family, or a UserError saying what the folder is instead."""
    file = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise UserError(f"--hf {hf_dir} is not a folder")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the Hugging Face config {file}: {e}") from None
    family = family_of_hf_model_type(config.get("model_type"))
    if family is None:
        known = ", ".join(f"'{f.hf_model_type}' ({f.hf_architecture})" for f in FAMILIES.values())
        raise UserError(f"{file} describes model_type '{config.get('model_type')}'; megacpt converts {known}")
    heads = config.get("num_attention_heads") or 1
    # What megacpt's model of the family fixes: another value would compute something else.
    fixed = {"hidden_act": "gelu", "attention_bias": True} if family.name == "neox" else {
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "use_sliding_window": False,
        "head_dim": config.get("hidden_size", 0) // heads}
    for key, wanted in fixed.items():
        if config.get(key, wanted) not in (wanted, None):
            raise UserError(f"{file}: {key} {config[key]!r} is not supported; megacpt's {family.name} model has "
                            f"{key} {wanted!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    supported = ("default", "linear", "yarn") if family.name == "neox" else ("default", "linear", "llama3", "yarn")
    if rope_type not in supported:
        raise UserError(f"{file}: rope_type '{rope_type}' is not supported for {family.name}; megacpt converts "
                        f"{', '.join(supported)} RoPE")
    if rope_type == "yarn":
        check_yarn(file, rope)
    return config


def check_yarn(file: Path, rope: dict) -> None:
    """Hugging Face's YaRN may scale attention otherwise than by its default 0.1 ln(factor) + 1 (DeepSeek's
    mscale pair, an explicit attention_factor) or round the ramp's ends differently (truncate false);
    megatron-core's, as megacpt builds it, cannot."""
    factor = rope.get("factor") or 1.0
    default = 0.1 * math.log(factor) + 1 if factor > 1 else 1.0
    if rope.get("truncate", True) is not True:
        raise UserError(f"{file}: yarn's truncate {rope['truncate']!r} is not supported; megacpt rounds the ramp's "
                        "ends to whole frequencies (truncate true)")
    if rope.get("mscale") and rope.get("mscale_all_dim"):
        raise UserError(f"{file}: yarn's mscale {rope['mscale']} and mscale_all_dim {rope['mscale_all_dim']} are not "
                        f"supported; megacpt's YaRN scales attention by 0.1 ln(factor) + 1 = {default:.6g}")
    given = rope.get("attention_factor")
    if given is not None and not math.isclose(given, default, rel_tol=1e-6):
        raise UserError(f"{file}: yarn's attention_factor {given} is not supported; megacpt's YaRN scales attention "
                        f"by 0.1 ln(factor) + 1 = {default:.6g}")


def model_config_from_hf(hf_config: dict, hf_dir: Path) -> ModelConfig:
    try:
        return ModelConfig(**hf_mapping.model_fields_from_hf(hf_config))
    except (KeyError, ValidationError) as e:
        raise UserError(f"{hf_dir / 'config.json'} is not a usable {hf_config.get('model_type')} config: "
                        f"{_first_problem(e)}") from None


def _first_problem(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(map(str, err['loc'])) or 'model'}: {err['msg'].removeprefix('Value error, ')}"
    return f"missing key {e}"


def hf_class(family: Family):
    """The transformers class of the family (e.g. LlamaForCausalLM)."""
    import transformers

    return getattr(transformers, family.hf_architecture)


def load_hf(hf_dir: Path, family: Family, dtype):
    """The family's transformers model with every weight from the folder (a missing tensor is an error, not a
    random init)."""
    from safetensors import SafetensorError

    try:
        model, info = hf_class(family).from_pretrained(hf_dir, dtype=dtype, output_loading_info=True)
    except (OSError, SafetensorError, EOFError, RuntimeError) as e:  # missing, truncated or corrupt weight files
        weights = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
        raise UserError(f"cannot load the weights in {hf_dir} ({', '.join(weights) or 'no weight files'}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; the download or copy may be "
                        "incomplete") from None
    if info["missing_keys"] or info["mismatched_keys"]:
        problems = sorted(info["missing_keys"]) + [str(k) for k in info["mismatched_keys"]]
        raise UserError(f"the weights in {hf_dir} are incomplete: missing or mis-shaped {', '.join(problems[:5])}"
                        f"{' ...' if len(problems) > 5 else ''}")
    return model.eval()


def hf_config(model: ModelConfig, eod: int | None):
    """The transformers config of megacpt's model (GPTNeoXConfig, LlamaConfig, MistralConfig or Qwen2Config)."""
    import transformers

    family = FAMILIES[model.family]
    common = dict(vocab_size=model.vocab_size, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
                  num_attention_heads=model.num_attention_heads, intermediate_size=model.ffn_hidden_size,
                  max_position_embeddings=model.seq_length, initializer_range=model.init_std,
                  tie_word_embeddings=model.tie_embeddings, bos_token_id=eod, eos_token_id=eod,
                  architectures=[family.hf_architecture])
    if family.name == "neox":
        # rotary given by its legacy names, which transformers 4 and 5 read
        return transformers.GPTNeoXConfig(
            **common, rotary_pct=model.rotary_pct, rotary_emb_base=model.rotary_base,
            rope_parameters={**rope_parameters(model), "partial_rotary_factor": model.rotary_pct},
            use_parallel_residual=model.parallel_residual, layer_norm_eps=model.layernorm_eps, hidden_act="gelu",
            attention_bias=True, hidden_dropout=model.dropout, attention_dropout=model.dropout)
    own = {"mistral": dict(sliding_window=model.sliding_window, head_dim=model.head_dim),
           "qwen2": dict(use_sliding_window=False, sliding_window=None, max_window_layers=model.num_layers),
           "llama": dict(attention_bias=False, mlp_bias=False, head_dim=model.head_dim)}[family.name]
    config_class = getattr(transformers, family.hf_architecture.replace("ForCausalLM", "Config"))
    return config_class(**common, **own, num_key_value_heads=model.num_query_groups, hidden_act="silu",
                        rms_norm_eps=model.layernorm_eps, attention_dropout=model.dropout,
                        rope_parameters=rope_parameters(model))


def rope_parameters(model: ModelConfig) -> dict:
    """Hugging Face's rope_parameters (transformers 5): rope_theta and the rope_scaling entries."""
    scaling = model.rope_scaling.hf_dict() if model.rope_scaling else {"rope_type": "default"}
    return {"rope_theta": float(model.rotary_base), **scaling}


def save_sentencepiece_as_hf(model_file: Path, folder: Path) -> None:
    """The SentencePiece model as a Hugging Face fast tokenizer (tokenizer.json and its config) in `folder`.

    transformers' own converter builds it from the model's pieces, scores and normalizer spec; it is then
    checked to encode a text made of every normal piece (and some whitespace) exactly as SentencePiece does.
    Unlike SentencePiece, the Hugging Face tokenizer reads the literal text of its special tokens (`</s>`)
    as those tokens, as every Hugging Face tokenizer does.
    """
    import sentencepiece
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    from megacpt.data.vocab_extension import read_sentencepiece

    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        print("note: this transformers version cannot convert a SentencePiece model by itself (transformers 5 can); "
              "no tokenizer written")
        return
    proto = read_sentencepiece(model_file, "the checkpoint's tokenizer")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)},
                                                          legacy=True)
    special = {"unk_token": proto.trainer_spec.unk_id, "eos_token": proto.trainer_spec.eos_id}
    PreTrainedTokenizerFast(tokenizer_object=backend, **{name: proto.pieces[i].piece for name, i in special.items()
                                                        if i >= 0}).save_pretrained(folder)
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    text = "  " + " ".join(p.piece.replace("▁", " ") for p in proto.pieces if p.type == p.NORMAL) + "\n\tend  "
    if AutoTokenizer.from_pretrained(folder).encode(text, add_special_tokens=False) != processor.encode(text):
        raise VerificationFailed(f"the Hugging Face form of {model_file} encodes text differently from SentencePiece")


def save_hf(folder: Path, hf_state: dict[str, torch.Tensor], config, family: Family) -> None:
    """save_pretrained of a model holding `hf_state` (built on the meta device: no random init to pay for).

    config.json also gets `rope_theta` and `rope_scaling` next to transformers 5's `rope_parameters`, as
    published Llama, Mistral and Qwen2 folders have them, for readers older than transformers 5."""
    with torch.device("meta"):
        model = hf_class(family)(config)
    expected = model.state_dict()
    if "embed_out.weight" in hf_state and "embed_out.weight" not in expected:  # transformers 5 says lm_head
        hf_state["lm_head.weight"] = hf_state.pop("embed_out.weight")
    if config.tie_word_embeddings:
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
    model.load_state_dict(hf_state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(folder)
    if family.name != "neox":
        file = folder / "config.json"
        written = json.loads(file.read_text(encoding="utf-8"))
        rope = written["rope_parameters"]
        written["rope_theta"] = rope["rope_theta"]
        written["rope_scaling"] = None if rope["rope_type"] == "default" else {
            k: v for k, v in rope.items() if k != "rope_theta"}
        file.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------ verification


def verify_device(name: str | None) -> torch.device:
    """The device megatron's world runs on here; megatron-core cannot compute on the CPU when CUDA is present."""
    has_cuda = torch.cuda.is_available()
    if name == "cuda" and not has_cuda:
        raise UserError("--verify-device cuda: this machine has no CUDA device")
    if name == "cpu" and has_cuda:
        raise UserError("--verify-device cpu: megatron-core places rotary embeddings on the GPU when CUDA is present; "
                        "hide the GPUs (CUDA_VISIBLE_DEVICES=) to verify on the CPU")
    return torch.device("cuda" if has_cuda else "cpu")


def check_logits(hf_model, weights: dict[str, torch.Tensor], model: ModelConfig, device: torch.device,
                 threshold: float) -> float:
    """Max |logit difference| over the real vocabulary between the HF model and megacpt's model of `weights`."""
    diff = max_logit_difference(hf_model, weights, model, device)
    print(f"verification: max |logit difference| {diff:.3e} (threshold {threshold:g}, float32 on {device.type})")
    if not diff <= threshold:  # also catches NaN
        raise VerificationFailed(f"max |logit difference| {diff:.3e} is above the threshold {threshold:g}")
    return diff


@torch.no_grad()
def max_logit_difference(hf_model, weights: dict[str, torch.Tensor], model: ModelConfig, device: torch.device) -> float:
    from megacpt.runtime.distributed import setup_world

    setup_world(1, seed=0)
    megacpt_model = checkpoint_io.build_model(model, weights, 1, 0, device)
    hf_model = hf_model.float().to(device).eval()
    batch, length = VERIFY_BATCH[0], min(VERIFY_BATCH[1], model.seq_length)
    ids = torch.randint(0, model.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(length, device=device).unsqueeze(0).expand_as(ids)
    ours = megacpt_model(ids, positions, None)[..., : model.vocab_size].float()
    reference = hf_model(ids).logits.float()
    return (ours - reference).abs().max().item()
