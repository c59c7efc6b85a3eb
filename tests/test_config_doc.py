"""docs/CONFIG.md is generated from the schema; it must not go stale."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "config_doc.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_every_key_has_a_description():
    from megacpt.config import RunConfig, inner_model

    pending = [RunConfig]
    while pending:
        model = pending.pop()
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            inner = inner_model(field.annotation)
            if inner is not None:
                pending.append(inner)
