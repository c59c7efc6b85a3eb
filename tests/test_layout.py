"""The rules the package layout stands for, checked by reading every module's source (nothing is imported:
`ast` walks it, lazy imports inside functions included).

- A *command module* defines both `add_arguments(parser)` and `run(args)` at its top level: argparse and
  printing for one `megacpt` subcommand, in a file named `*_command.py`. No module imports one;
  `megacpt/cli.py` reaches them only by name, through its COMMANDS table and importlib.
- The *trainer core* (the top-level modules of megacpt/ and the policy, checkpoint, runtime, train, model and
  data subpackages) never imports the evaluation, prediction, planning, weights, sweep or demo subpackages.
- The CPT policy (megacpt/policy/) imports neither torch, DeepSpeed nor megatron, directly or through other
  megacpt modules; the config schema imports nothing from the data package.
- No import cycle between megacpt's modules; at most 16 modules at the top of megacpt/.
- The loop is extended through its callbacks only: no module assigns an optimizer's `step`.
- RUN_DIR's file names are spelled in run_dir.py only.
- The CPU fallback is about megatron-core on the CPU only: it imports nothing from DeepSpeed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megacpt"
OUTSIDE_CORE = ("evaluation", "prediction", "planning", "weights", "sweep", "demo")
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


def runtime_nodes(tree: ast.AST):
    """Every node of the tree except those under `if TYPE_CHECKING:` (imported for type hints only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def imported(name: str, tree: ast.Module) -> set[str]:
    """Every module `name` imports at run time, at any depth; `from package import module` counts as importing
    the module."""
    package = name if name in PACKAGES else name.rpartition(".")[0]
    found = set()
    for node in runtime_nodes(tree):
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
    assert all(name.endswith("_command") for name in COMMAND_MODULES), COMMAND_MODULES


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_command_module(name):
    offending = sorted(m for m in imported(name, MODULES[name]) if m in COMMAND_MODULES and m != name)
    assert not offending, f"{name} imports the command module(s) {offending}; move what they share to a library"


CORE_PACKAGES = ("policy", "checkpoint", "runtime", "train", "model", "data")
CORE = sorted(name for name in MODULES
              if name.count(".") <= 1 or name.split(".")[1] in CORE_PACKAGES)


@pytest.mark.parametrize("name", CORE)
def test_the_trainer_core_imports_no_evaluation_prediction_planning_tools_or_demo_code(name):
    offending = sorted(m for m in imported(name, MODULES[name]) if m.split(".")[:2] in OUTSIDE_CORE_PATHS)
    assert not offending, f"the trainer core module {name} imports {offending}"


def test_the_cpu_fallback_imports_nothing_from_deepspeed():
    modules = imported("megacpt.model.cpu_fallback", MODULES["megacpt.model.cpu_fallback"])
    assert not [m for m in modules if m == "deepspeed" or m.startswith("deepspeed.")]


def internal_graph() -> dict[str, set[str]]:
    """megacpt module -> the megacpt modules it imports (packages' empty __init__ files included as nodes)."""
    return {name: {m for m in imported(name, tree) if m in MODULES and m != name} for name, tree in MODULES.items()}


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_there_is_no_import_cycle():
    graph = internal_graph()
    cycles = sorted(name for name in graph if name in reachable(name, graph))
    assert not cycles, f"modules on an import cycle: {cycles}"


POLICY = sorted(name for name in MODULES if name.startswith("megacpt.policy"))


@pytest.mark.parametrize("name", POLICY)
def test_the_cpt_policy_imports_no_torch_deepspeed_or_megatron(name):
    graph = internal_graph()
    through = {name} | reachable(name, graph)
    heavy = sorted({f"{module} -> {m}" for module in through for m in imported(module, MODULES[module])
                    if m.split(".")[0] in ("torch", "deepspeed", "megatron")})
    assert not heavy, f"{name} reaches {heavy}"


def test_the_config_schema_imports_nothing_from_data():
    assert not [m for m in imported("megacpt.config", MODULES["megacpt.config"]) if m.startswith("megacpt.data")]


def test_the_top_level_holds_at_most_16_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 16, top


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_assigns_an_optimizers_step(name):
    patched = [ast.unparse(target) for node in ast.walk(MODULES[name]) if isinstance(node, ast.Assign)
               for target in node.targets if isinstance(target, ast.Attribute) and target.attr == "step"]
    assert not patched, f"{name} assigns {patched}: extend the loop through train/callbacks.py instead"


RUN_DIR_NAMES = ("metrics.jsonl", "samples.jsonl", "spike_ledger.json", "wandb_run_id", "checkpoints", ".megacpt.lock",
                 "data_cache")


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"megacpt.run_dir"}))
def test_run_dir_file_names_are_spelled_in_run_dir_only(name):
    spelled = [node.value for node in ast.walk(MODULES[name]) if isinstance(node, ast.Constant)
               and isinstance(node.value, str) and node.value in RUN_DIR_NAMES]
    assert not spelled, f"{name} spells {spelled}; use the names of megacpt/run_dir.py"
