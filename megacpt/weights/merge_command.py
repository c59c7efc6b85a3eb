"""`megacpt merge --checkpoints A B ... --weights wA wB ... --output DIR`: weight averaging of models.

theta = sum_i w_i * theta_i, tensor by tensor in float32, stored in the first checkpoint's dtype. The
weights must sum to 1 (an average; a negative weight extrapolates). The models must share the architecture;
their TP degrees may differ (every checkpoint's shards are merged first; the output takes the first one's
degree). Config, tokenizer, stage history and counters come from the first checkpoint; `merge` in the state
records every source and weight. The output is weights only. FoMo-in-Flux's finetune-merge and EMA-merge are
special cases (docs/CONVERT.md).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from megacpt.errors import UserError
from megacpt.policy.stages import MergeSource, ModelSignature
from megacpt.weights import checkpoint_io


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", required=True, nargs="+", metavar="DIR",
                        help="megacpt checkpoints (folders or tags), at least two")
    parser.add_argument("--weights", required=True, nargs="+", type=float, metavar="W",
                        help="one weight per checkpoint, summing to 1")
    checkpoint_io.add_output_arguments(parser, "checkpoints folder (one tag and `latest`)")


def run(args: argparse.Namespace) -> int:
    check_weights(args.checkpoints, args.weights)
    with checkpoint_io.staged_output(args.output, args.overwrite, args.checkpoints) as staging:
        sources = [checkpoint_io.load(path, key=f"--checkpoints[{i}]") for i, path in enumerate(args.checkpoints)]
        check_architectures(sources)
        first = sources[0]
        merged = average([checkpoint_io.resize_vocab(s.weights, first.padded_vocab_size) for s in sources],
                         args.weights)
        merge = [MergeSource(checkpoint=str(s.tag_dir.resolve()), weight=w) for s, w in zip(sources, args.weights)]
        state = first.state.model_copy(update={"merge": merge})
        checkpoint_io.write(staging, merged,
                            checkpoint_io.weights_only_state(state, first.model, first.tensor_parallel),
                            Path(args.output))
    print(f"wrote {args.output}: " + " + ".join(f"{w:g} x {s.tag_dir}" for s, w in zip(sources, args.weights)))
    return 0


def check_weights(checkpoints: list[str], weights: list[float]) -> None:
    if len(checkpoints) < 2:
        raise UserError("--checkpoints: a merge needs at least two checkpoints")
    if len(weights) != len(checkpoints):
        raise UserError(f"--weights: {len(weights)} weights for {len(checkpoints)} checkpoints; give one per "
                        "checkpoint")
    if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise UserError(f"--weights {' '.join(map(str, weights))} sum to {sum(weights):g}; an average needs weights "
                        "summing to 1")


def architecture(source: checkpoint_io.Checkpoint) -> dict:
    """What two models must share for their weights to be averaged (TP degree and padding excepted)."""
    model = source.model
    return {**ModelSignature.of(model, 1).model_dump(), "vocab_size": model.vocab_size}


def check_architectures(sources: list[checkpoint_io.Checkpoint]) -> None:
    wanted = architecture(sources[0])
    for source in sources[1:]:
        found = architecture(source)
        diffs = [f"{k} {found[k]} vs {v}" for k, v in wanted.items() if found[k] != v]
        if diffs:
            raise UserError(f"cannot merge {source.tag_dir} with {sources[0].tag_dir}: different architectures "
                            f"({'; '.join(diffs)})")


def average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i per tensor, accumulated in float32 and returned in the first state's dtypes."""
    out = {}
    for name, first in states[0].items():
        total = torch.zeros(first.shape, dtype=torch.float32)
        for weight, state in zip(weights, states):
            total += weight * state[name].float()
        out[name] = total.to(first.dtype)
    return out
