"""The package's import graph: no circle, no upward arrow between layers, pure parts stay pure.

Every import counts, function-level ones included (a lazy import hides a circle, it does not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parents[2] / "lmms_tokprune"

# Lower layers never import higher ones; a module may import its own layer's other modules.
LAYERS = {
    "catalog": 0, "coerce": 0, "paths": 0, "assets": 0,
    "methods": 1, "efficiency": 1,
    "offline_processors": 1,  # the offline tokenizers / processors production and testing/ both build
    "testing": 2,
    "llava": 3,
    "harness": 4,
    "report": 5, "bench": 5, "demo": 5,
    "sweep": 6,
    "cli": 7, "__init__": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str, is_package: bool) -> Set[str]:
    """Names of lmms_tokprune modules (and third-party top-level modules) that `path` imports."""
    out: Set[str] = set()
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = base[: len(base) - node.level + 1]
                module = ".".join(prefix + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}  # `from . import x` may name a submodule
    return out


def graph() -> Dict[str, Set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        raw = _imports(path, name, path.name == "__init__.py")
        edges[name] = {m for m in raw if m in modules and m != name}
        edges[name] |= {m for m in raw if not m.startswith("lmms_tokprune")}  # third-party names, checked below
    return edges


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_every_module_has_a_layer():
    for module in graph():
        assert len(module.split(".")) == 1 or module.split(".")[1] in LAYERS, f"{module}: add its folder to LAYERS"


def test_no_import_circle():
    edges = {m: {d for d in deps if d.startswith("lmms_tokprune")} for m, deps in graph().items()}
    state: Dict[str, int] = {}

    def visit(node: str, stack: list) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]) if dep in stack else dep)
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_no_upward_arrow():
    bad = [f"{m} -> {d}" for m, deps in graph().items() for d in deps
           if d.startswith("lmms_tokprune.") and _layer(d) > _layer(m)]
    assert not bad, "imports from a higher layer:\n" + "\n".join(sorted(bad))


def test_pure_parts_stay_pure():
    """methods/ is pure torch (no transformers, no lmms-eval); efficiency/ never imports the model code; the
    catalog is torch-free; nothing imports the build-time recipes/."""
    for module, deps in graph().items():
        third = {d.split(".")[0] for d in deps}
        assert "recipes" not in third, module
        if module.startswith("lmms_tokprune.methods"):
            assert not third & {"transformers", "lmms_eval", "accelerate"}, module
        if module.startswith("lmms_tokprune.efficiency"):
            assert not any(d.startswith(("lmms_tokprune.llava", "lmms_tokprune.harness", "lmms_tokprune.bench")) for d in deps), module
        if module in ("lmms_tokprune.catalog", "lmms_tokprune.coerce", "lmms_tokprune.report.leaderboard"):
            assert "torch" not in third, module
