"""The package's shape (issue 12): layers that only import downwards, no import cycle (imports inside
functions included), no function over 80 lines, argparse only in the cli layer. Read from the source
with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sd_cli"
# Top to bottom: a module may import from its own layer or any layer below it, never above.
LAYERS = ("cli", "run", "pipeline", "output", "weights", "model", "sampling", "demo")
SHARED = {"sd_cli.errors", "sd_cli.version"}  # leaves every layer may use
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str) -> set[str]:
    """Every sd_cli module `path` imports, anywhere in the file (functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sd_cli"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("sd_cli"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # `from sd_cli.demo import scenes`
    modules = _modules()
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_sits_in_a_layer_or_is_a_shared_leaf_or_entry_point():
    entry = {"sd_cli", "sd_cli.__main__", "sd_cli.train_demo", "sd_cli.eval_demo"}  # `python -m` names
    loose = [m for m in _modules() if _layer(m) is None and m not in SHARED | entry]
    assert loose == []


def test_imports_only_go_down():
    wrong = []
    for name, path in _modules().items():
        mine = _layer(name)
        for target in _imports(path, name):
            theirs = _layer(target)
            if target in SHARED or name in SHARED and target in SHARED:
                continue
            if name in SHARED:
                wrong.append(f"{name} -> {target} (a shared leaf imports nothing of ours)")
            elif mine is not None and (theirs is None or LAYERS.index(theirs) < LAYERS.index(mine)):
                wrong.append(f"{name} ({mine}) -> {target} ({theirs})")
    assert wrong == []


def test_no_import_cycle():
    graph = {name: _imports(path, name) for name, path in _modules().items()}
    graph = {k: {t for t in v if t != "sd_cli"} for k, v in graph.items()}  # the root only re-exports lazily
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if state.get(start) is None and visit(start, []):
            break
    assert cycle == []


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with model -> run and run -> model is caught."""
    pkg = tmp_path / "sd_cli"
    for sub in ("run", "model"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "run" / "a.py").write_text("from sd_cli.model import b\n")
    (pkg / "model" / "b.py").write_text("def f():\n    from sd_cli.run import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(AssertionError):
        test_imports_only_go_down()
    with pytest.raises(AssertionError):
        test_no_import_cycle()


def test_no_function_longer_than_80_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert long == []


def test_only_the_cli_layer_sees_argparse():
    users = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if "argparse" in imported and _layer(name) != "cli":
            users.append(name)
    assert users == []


def _defines(tree: ast.AST, what: str) -> bool:
    for node in ast.walk(tree):
        if what == "scale_factor" and isinstance(node, ast.Constant) and node.value == 0.18215:
            return True
        if what == "schedule" and isinstance(node, ast.Constant) and node.value in (0.00085, 0.012):
            return True
        if what == "config" and isinstance(node, ast.Constant) and node.value == "configs/stable-diffusion/v1-inference.yaml":
            return True
        if what == "demo" and isinstance(node, ast.Constant) and node.value in ("demo.safetensors", "demo.yaml", "demo"):
            return True
        if what == "dtypes" and isinstance(node, ast.Tuple):
            values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
            if {"fp32", "bf16", "fp16"} <= values:
                return True
    return False


@pytest.mark.parametrize("what, where", [
    ("scale_factor", "sd_cli/model/ldm.py"),
    ("schedule", "sd_cli/sampling/schedule.py"),
    ("config", "sd_cli/weights/config.py"),
    ("dtypes", "sd_cli/weights/dtypes.py"),
    ("demo", "sd_cli/demo/__init__.py"),
])
def test_constants_are_defined_once(what, where):
    """SD's latent scale 0.18215, the noise schedule, the default config path, the dtype choices and the
    demo model's files: written in code once (docstrings aside: they are not code), where they belong."""
    places = [str(path.relative_to(PACKAGE.parent)) for path in sorted(PACKAGE.rglob("*.py"))
              if _defines(ast.parse(path.read_text(encoding="utf-8")), what)]
    assert places == [where]
