"""Generate docs/CONFIG.md, the reference of every config key, from the pydantic schema.

    python tools/config_doc.py            # rewrite docs/CONFIG.md
    python tools/config_doc.py --check    # exit 1 if docs/CONFIG.md is stale (the test suite runs this)
"""
from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from megacpt.config import RunConfig, inner_model

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("megacpt.config.", "")
    return text.removeprefix("<class '").removesuffix("'>").replace(" | ", " or ")


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "(section defaults)" if inner_model(field.annotation) else "`[]`" if "list" in str(field.annotation) else "`{}`"
    return f"`{field.default!r}`".replace("None", "null").replace("True", "true").replace("False", "false")


def render() -> str:
    lines = ["# Config reference", "",
             "Generated from `megacpt/config.py` by `python tools/config_doc.py`; do not edit by hand.",
             "A run config is one JSON object; `--set dotted.key=value` overrides any key.", ""]
    sections: list[tuple[str, type[BaseModel]]] = [("", RunConfig)]
    while sections:
        prefix, model = sections.pop(0)
        lines += [f"## `{prefix or 'top level'}`", "", (model.__doc__ or "").strip(), "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            lines.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
            inner = inner_model(field.annotation)
            if inner is not None:
                sections.append((key + ("[]" if "list" in str(field.annotation) else ""), inner))
        lines.append("")
    return "\n".join(lines)


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
