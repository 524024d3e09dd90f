"""The package's import structure: no import cycles, and imports only go down the layers of docs/design.md
(config -> models/rewards/solvers -> algorithms -> iteration -> run -> CLI), module sizes within bounds."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "neighbor_grpo"
DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
LAYERS = ["config", "models, rewards, solvers", "algorithms", "iteration", "run", "CLI"]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """The package modules `path` imports (at any depth: lazy imports inside functions count too).
    `from neighbor_grpo.bench import rules` imports the module `bench.rules`, not the folder's `__init__`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neighbor_grpo"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                relative = Path(*submodule.split(".")[1:])
                is_module = (package / relative).with_suffix(".py").is_file() or (package / relative).is_dir()
                found.add(submodule if is_module else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("neighbor_grpo"))
    return found


def all_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path, package): path for path in package.rglob("*.py")}


def layer_table() -> dict[str, int]:
    """docs/design.md's table: | layer | modules | -> {module or package prefix: layer number}."""
    table = {}
    section = DESIGN.read_text().split("## Layers", 1)[1]
    for line in section.splitlines():
        match = re.match(r"\|\s*(\d)\s*\|[^|]*\|([^|]+)\|", line)
        if match:
            for name in re.findall(r"`([\w.*]+)`", match.group(2)):
                table[name.rstrip(".*")] = int(match.group(1))
    return table


def layer_of(module: str, table: dict[str, int]) -> int:
    name = module.removeprefix("neighbor_grpo").lstrip(".") or "neighbor_grpo"
    while name:
        if name in table:
            return table[name]
        name = name.rpartition(".")[0]
    raise KeyError(module)


def test_every_module_has_a_layer():
    table = layer_table()
    assert set(table.values()) == set(range(len(LAYERS)))
    missing = []
    for module in all_modules():
        try:
            layer_of(module, table)
        except KeyError:
            missing.append(module)
    assert not missing, f"add these modules to the layer table in docs/design.md: {missing}"


def upward_imports(package: Path = PACKAGE) -> list[str]:
    table = layer_table()
    return [f"{module} (layer {layer_of(module, table)}) imports {target} (layer {layer_of(target, table)})"
            for module, path in all_modules(package).items() for target in internal_imports(path, package)
            if layer_of(target, table) > layer_of(module, table)]


def test_imports_only_go_down_the_layers():
    upward = upward_imports()
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module, injected", [
    ("maths/flow.py", "from neighbor_grpo.training.trainer import train"),  # a folder module reaching up
    ("config/prompts.py", "from neighbor_grpo.bench import compare"),        # through a folder's import
    ("models/digits.py", "import neighbor_grpo.algorithms.neighbor_grpo"),
    ("runs/io.py", "from neighbor_grpo import train"),                       # the public API is the top layer
])
def test_an_injected_upward_import_is_caught(tmp_path, module, injected):
    copy = tmp_path / "neighbor_grpo"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n\ndef _injected():\n    {injected}\n")
    assert upward_imports(copy) and not upward_imports(PACKAGE)
    assert any(line.startswith(module_name(target, copy)) for line in upward_imports(copy))


def test_every_folder_says_what_lives_there():
    """Each folder's `__init__` docstring names every module in the folder (docs/design.md's table of folders)."""
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init.relative_to(PACKAGE)}: no docstring"
        if init.parent.name in ("models", "rewards", "algorithms", "plan"):
            continue  # registries and the planner: their docstrings describe the contract, the layer table the modules
        modules = [p.stem for p in init.parent.glob("*.py") if not p.stem.startswith("__")]
        unnamed = [m for m in modules if f"`{m}`" not in doc]
        assert not unnamed, f"{init.parent.name}/__init__.py does not name {unnamed}"


def test_no_import_cycles():
    modules = all_modules()
    graph = {m: {t for t in internal_imports(p) if t in modules and t != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages expose them, not a cycle
    graph = {m: {t for t in targets if not (t.startswith(m + ".") and modules[m].name == "__init__.py")}
             for m, targets in graph.items()}
    state, cycles = {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_small(path):
    if path.name == "train_config.py" and path.parent == PACKAGE / "config":
        return  # the one place every option and its docstring lives
    assert len(path.read_text().splitlines()) <= 400, f"{path.name}: split it (at most 400 lines a module)"


def test_train_is_one_short_loop():
    tree = ast.parse((PACKAGE / "training" / "trainer.py").read_text())
    train = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 80


def test_config_layer_names_match_the_registries():
    from neighbor_grpo.config.algorithm_settings import ALGORITHM_SETTINGS, SOLVER_NAMES
    from neighbor_grpo.algorithms import ALGORITHMS
    from neighbor_grpo.maths.solvers import SOLVERS

    assert set(ALGORITHM_SETTINGS) == set(ALGORITHMS) and set(SOLVER_NAMES) == set(SOLVERS)
    for name, algorithm in ALGORITHMS.items():  # each algorithm reads the settings class of its section
        assert type(algorithm().config) is ALGORITHM_SETTINGS[name]
