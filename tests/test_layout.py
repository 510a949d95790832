"""The package's import graph: no cycles, layers point one way, argv parsing only in cli/.

Every `import` in every module counts, at module level or inside a function (a lazy import still ties the two
modules together and still closes a cycle at run time). Read with `ast`, so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nanoseek

ROOT = Path(nanoseek.__file__).parent
# Lowest first: a module may import its own layer and the ones before it, never a later one.
# DESIGN.md's "layers point one way", with distributed/ (process group, DDP/FSDP2, EP: it needs only the model)
# placed below checkpoint/, whose dcp.py saves and loads sharded checkpoints through the process group.
LAYERS = [
    {"config", "presets", "tokenizer", "io"},
    {"model", "tasks", "data"},
    {"distributed"},
    {"checkpoint"},
    {"infer"},
    {"eval", "export"},
    {"train"},
    {"speedrun"},
    {"cli", "__main__", ""},  # "": the package itself, whose __init__ re-exports the public API
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _module_name(path: Path) -> str:
    parts = ["nanoseek", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file; `from pkg import sub` names the
    submodule when `sub` is one, and relative imports are resolved."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}
GRAPH = {name: {m for m, _ in imps if m in MODULES and m != name} for name, imps in IMPORTS.items()}


def _part(module: str) -> str:
    """The top-level part of nanoseek a module belongs to: `nanoseek.train.grpo` -> `train`."""
    return module.split(".")[1] if "." in module else ""


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def _violations(rule) -> list[str]:
    """`file:line imports module` for every import of a nanoseek module for which rule(importer, imported)."""
    return [
        f"{_where(a, line)} imports {b}"
        for a, imps in IMPORTS.items()
        for b, line in imps
        if b in MODULES and b != a and rule(a, b)
    ]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(comp)) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, staying inside the component."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # unreachable: comp is strongly connected


def test_the_walk_sees_every_module_and_lazy_imports():
    assert {"nanoseek.model.transformer", "nanoseek.cli.main", "nanoseek.io"} <= set(MODULES)
    assert all(_part(m) in RANK for m in MODULES), sorted({_part(m) for m in MODULES} - set(RANK))
    # a function-level import counts: prepare() reads the built-in corpus only when asked to
    assert "nanoseek.tasks.problems" in GRAPH["nanoseek.data.shards"]


def test_cycle_finder_reports_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_argparse_only_in_cli():
    bad = [
        _where(name, line)
        for name, imps in IMPORTS.items()
        for m, line in imps
        if m.split(".")[0] == "argparse" and _part(name) not in ("cli", "__main__")
    ]
    assert not bad, "library code parses no argv; argparse imported at " + ", ".join(bad)


def test_library_never_imports_the_cli():
    bad = _violations(lambda a, b: _part(b) == "cli" and _part(a) not in ("cli", "__main__", ""))
    assert not bad, "\n".join(bad)


def test_model_imports_no_training_serving_or_eval_code():
    bad = _violations(lambda a, b: _part(a) == "model" and _part(b) in ("train", "infer", "eval", "speedrun", "cli"))
    assert not bad, "\n".join(bad)


def test_engine_imports_no_training_code():
    bad = _violations(lambda a, b: _part(a) == "infer" and _part(b) == "train")
    assert not bad, "\n".join(bad)


def test_layers_point_one_way():
    bad = _violations(lambda a, b: RANK[_part(b)] > RANK[_part(a)])
    assert not bad, (
        "upward imports (layers, lowest first: "
        + " < ".join("/".join(sorted(x)) for x in LAYERS)
        + "):\n"
        + "\n".join(bad)
    )
