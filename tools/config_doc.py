"""Generate docs/CONFIG.md, the reference of every config key, from the pydantic schema.

    python tools/config_doc.py            # rewrite docs/CONFIG.md
    python tools/config_doc.py --check    # exit 1 if docs/CONFIG.md is stale (the test suite runs this)
"""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from megacpt.config import DEEPSPEED_KEYS, DeepSpeedSection, RunConfig, inner_model
from megacpt.runtime.deepspeed_config import derived_deepspeed_config

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("megacpt.config.", "")
    return text.removeprefix("<class '").removesuffix("'>").replace(" | ", " or ")


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        if inner_model(field.annotation):
            return "(section defaults)"
        return "`[]`" if "list" in str(field.annotation) else "`{}`"
    return f"`{field.default!r}`".replace("None", "null").replace("True", "true").replace("False", "false")


def render() -> str:
    lines = ["# Config reference", "",
             "Generated from `megacpt/config.py` by `python tools/config_doc.py`; do not edit by hand.",
             "A run config is one JSON object; `--set dotted.key=value` overrides any key. No value may be",
             "`Infinity` or `NaN`.", ""]
    return "\n".join(lines + tables("", RunConfig) + deepspeed_keys() + deepspeed_defaults())


def tables(root_key: str, root: type[BaseModel]) -> list[str]:
    """One table per section under `root`, whose keys start with `root_key`."""
    lines = []
    sections: list[tuple[str, type[BaseModel]]] = [(root_key, root)]
    while sections:
        prefix, model = sections.pop(0)
        lines += [f"## `{prefix or 'top level'}`", "", inspect.cleandoc(model.__doc__ or ""), "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            lines.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} "
                         "|")
            inner = inner_model(field.annotation)
            if inner is not None:
                sections.append((key + ("[]" if "list" in str(field.annotation) else ""), inner))
        lines.append("")
    return lines


def deepspeed_keys() -> list[str]:
    """The keys of the `deepspeed` section megacpt checks, and those it passes through untouched."""
    checked = set(DeepSpeedSection.model_fields)
    passed = ", ".join(f"`{key}`" for key in sorted(DEEPSPEED_KEYS - checked))
    return ["## The `deepspeed` section", "",
            "`deepspeed` is DeepSpeed's own config. megacpt checks the keys below, which it reads or fills, when it",
            "reads the config. Inside `zero_optimization`, `bf16` and `fp16` any other key passes to DeepSpeed;",
            "`optimizer` and `optimizer.params` accept only the keys listed. Of the other top-level keys, those",
            "DeepSpeed knows pass through untouched, and DeepSpeed checks them (as it checks every key it reads)",
            "before any process group starts, `--dry-run` included:", "", passed + ".", "",
            "Any other top-level key (a typo such as `zero_optimisation`) is refused.", ""] + tables("deepspeed",
                                                                                                 DeepSpeedSection)


def deepspeed_defaults() -> list[str]:
    """The `deepspeed` section megacpt derives for a config that sets none of it."""
    config = RunConfig.model_validate({
        "run_dir": "RUN", "model": {"preset": "pythia-410m"}, "data": {"sources": [{"name": "new", "prefix": "NEW"}]},
        "schedule": {"style": "cosine", "max_lr": 3e-4},
                                       "train": {"steps": 1000, "global_batch_size": 64, "micro_batch_size": 8},
    })
    derived = json.dumps(derived_deepspeed_config(config, data_parallel=2), indent=2)
    return ["## `deepspeed` as megacpt fills it", "",
            "The `deepspeed` section is DeepSpeed's own config. Keys you set are kept; megacpt adds the rest. For a",
            "run with global batch 64, micro batch 8 and data parallel 2 that sets no `deepspeed` key, the engine gets",
            "the JSON below. Batch sizes always come from `train` (a `deepspeed` value that disagrees is an error);",
            "`optimizer.params.lr` is the schedule's `max_lr`, and the schedule sets the LR before every step. Without",
            "a GPU, `bf16`/`fp16` are turned off and training runs in fp32. The optimizer is torch's fused AdamW",
            "(`torch_adam`, `fused`) unless `zero_optimization.offload_optimizer` moves it to DeepSpeed's CPU Adam.",
            "",
            "```json", derived, "```", ""]


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run `python tools/config_doc.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
