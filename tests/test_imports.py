"""The package's shape: imports flow one way (data -> models -> training -> evaluation ->
protocol -> cli), with no circle between modules, and the stages import nothing from the stages
after them."""

import ast
import os

import kd_histo

ROOT = os.path.dirname(kd_histo.__file__)
# Each stage may import from itself and from the stages listed before it.
STAGES = (
    "progress",  # the loops' progress (kd_histo.progress): every stage reports through it
    "atomic",
    "numbers",
    "settings",
    "schema",
    "convert",
    "data",
    "models",
    "training",
    "evaluation",
    "protocol",
    "cli",
)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
    """{module: kd_histo modules it imports anywhere in its body (function-level imports too)}."""
    modules = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                modules[_module_name(os.path.join(d, f))] = os.path.join(d, f)
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for t in targets:  # "from pkg import module" names the module; else the package
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t.startswith("kd_histo") and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m.endswith("__init__") or m == "kd_histo" or graph.get(m) is None:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def _package_modules(graph):
    """Package __init__ modules re-export their members: an import of the package is not an edge
    to every module in it, so they are left out of the circle search."""
    return {n: {d for d in deps if not _is_package(d)} for n, deps in graph.items()}


def _is_package(name):
    return os.path.isdir(os.path.join(os.path.dirname(ROOT), *name.split(".")))


def test_no_import_circle():
    graph = _package_modules(import_graph())
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _stage(module):
    part = module.split(".")[1] if "." in module else ""
    return STAGES.index(part) if part in STAGES else None


def test_stages_import_only_earlier_stages():
    backward = []
    for name, deps in import_graph().items():
        here = _stage(name)
        for dep in deps:
            there = _stage(dep)
            if here is not None and there is not None and there > here:
                backward.append(f"{name} imports {dep}")
    assert not backward, "\n".join(sorted(backward))
