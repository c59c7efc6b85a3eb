"""The import rules the package layout stands for, checked by reading every module's imports (nothing is
imported: `ast` walks the source, lazy imports inside functions included).

- A *command module* defines both `add_arguments(parser)` and `run(args)` at its top level: argparse and
  printing for one `megacpt` subcommand. No module imports one; `megacpt/cli.py` reaches them only by name,
  through its COMMANDS table and importlib. What commands share lives in library modules.
- The *trainer core* (the top-level modules of megacpt/, model/ and data/) never imports the evaluation,
  prediction, planning, tools or demo subpackages: training needs none of them.
- The CPU fallback is about megatron-core on the CPU only: it imports nothing from DeepSpeed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megacpt"
OUTSIDE_CORE = ("evaluation", "prediction", "planning", "tools", "demo")
OUTSIDE_CORE_PATHS = [["megacpt", package] for package in OUTSIDE_CORE]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {module_name(p) for p in PACKAGE.rglob("__init__.py")}


def is_command(tree: ast.Module) -> bool:
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return {"add_arguments", "run"} <= functions


COMMAND_MODULES = sorted(name for name, tree in MODULES.items() if is_command(tree))


def imported(name: str, tree: ast.Module) -> set[str]:
    """Every module `name` imports, at any depth; `from package import module` counts as importing the module."""
    package = name if name in PACKAGES else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return found


def cli_commands() -> dict[str, str]:
    """COMMANDS of megacpt/cli.py, read from its source: command name -> module."""
    for node in MODULES["megacpt.cli"].body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "COMMANDS":
            table = ast.literal_eval(node.value)
            return {command: module for command, (module, _) in table.items()}
    raise AssertionError("megacpt/cli.py has no COMMANDS table")


def test_the_command_modules_are_exactly_the_cli_commands():
    assert COMMAND_MODULES  # the definition finds them at all
    assert sorted(set(cli_commands().values())) == COMMAND_MODULES


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_command_module(name):
    offending = sorted(m for m in imported(name, MODULES[name]) if m in COMMAND_MODULES and m != name)
    assert not offending, f"{name} imports the command module(s) {offending}; move what they share to a library"


CORE = sorted(name for name in MODULES
              if name.count(".") == 1 or name.startswith(("megacpt.model.", "megacpt.data.")))


@pytest.mark.parametrize("name", CORE)
def test_the_trainer_core_imports_no_evaluation_prediction_planning_tools_or_demo_code(name):
    offending = sorted(m for m in imported(name, MODULES[name]) if m.split(".")[:2] in OUTSIDE_CORE_PATHS)
    assert not offending, f"the trainer core module {name} imports {offending}"


def test_the_cpu_fallback_imports_nothing_from_deepspeed():
    modules = imported("megacpt.model.cpu_fallback", MODULES["megacpt.model.cpu_fallback"])
    assert not [m for m in modules if m == "deepspeed" or m.startswith("deepspeed.")]
