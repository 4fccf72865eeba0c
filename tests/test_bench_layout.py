"""The benchmark code is one package in layers (issue 20): the harness at the bottom, one module per
table above it, the command on top, and no import circle -- neither inside ``fastadapters.bench``
nor between it and the rest of the package (``serving/`` holds no benchmark and imports none).

Imports are read from the source (every ``import`` statement, also those inside functions), so a
lazy import that closes a circle counts too."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastadapters")

# bottom to top: a module may import only modules of a lower layer (vllm_offline: a script that e2e
# runs in vLLM's own Python, where fastadapters may not be installed)
LAYERS = {"harness": 0, "vllm_offline": 0, "training": 1, "kernels": 1, "layers": 1, "e2e": 1, "command": 2}


def _modules():
    mods = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return mods


def _imports(name, path, known):
    """The fastadapters modules that ``name`` (file ``path``) imports, anywhere in the file."""
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:  # `from x import name`: the module x; a.b.c -> a.b
                t = t.rpartition(".")[0]
            if t and t != name and t != "fastadapters":  # the package root re-exports lazily
                out.add(t)
    return out


def _graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_bench_package_is_layered():
    graph = _graph()
    bench = {m for m in graph if m.startswith("fastadapters.bench.")}
    assert {m.rsplit(".", 1)[1] for m in bench} == set(LAYERS)
    for m in bench:
        for dep in graph[m]:
            if dep.startswith("fastadapters.bench."):
                low, high = dep.rsplit(".", 1)[1], m.rsplit(".", 1)[1]
                assert LAYERS[low] < LAYERS[high], f"{m} imports {dep}: a table may import only the harness"
    assert graph["fastadapters.bench.harness"] <= set(), "the harness imports no fastadapters module"
    assert graph["fastadapters.bench.vllm_offline"] == set(), "vllm_offline runs where fastadapters may be absent"
    assert graph["fastadapters.bench"] == set(), "importing the package must stay free (no torch)"


def test_no_module_outside_bench_imports_it():
    graph = _graph()
    for m, deps in graph.items():
        if not m.startswith("fastadapters.bench"):
            assert not {d for d in deps if d.startswith("fastadapters.bench")}, m
    assert not [m for m in graph if m.startswith("fastadapters.serving.") and "bench" in m]


def _cycle_through(graph, start):
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in graph.get(node, ()):
            if dep == start:
                return path + [dep]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, path + [dep]))
    return None


@pytest.mark.parametrize("module", ["harness", "training", "kernels", "layers", "e2e", "command"])
def test_no_import_circle_through_the_benchmarks(module):
    cycle = _cycle_through(_graph(), f"fastadapters.bench.{module}")
    assert cycle is None, " -> ".join(cycle)


def test_no_script_or_top_level_package_shadows_an_installed_module():
    """``python bench/x.py`` puts bench/ first on sys.path, and a process started in the repository
    root puts the root there: a script or package in either named like an installed module replaces
    it (transformers 5.25 imports Hugging Face's ``kernels``, which a ``bench/kernels.py`` or a
    top-level ``kernels/`` package hid: every model import failed)."""
    import importlib.machinery
    import sys

    repo = os.path.dirname(ROOT)
    bench = os.path.join(repo, "bench")
    mine = {os.path.realpath(p) for p in (repo, bench, os.path.join(repo, "tests"))}
    path = [p for p in sys.path if p and os.path.realpath(p) not in mine and not os.path.realpath(p).startswith(
        os.path.join(os.path.realpath(repo), "tests"))]
    names = {f[:-3] for f in os.listdir(bench) if f.endswith(".py")}
    names |= {d for d in os.listdir(repo) if os.path.isfile(os.path.join(repo, d, "__init__.py"))}
    names.discard("fastadapters")
    shadowed = sorted(n for n in names if importlib.machinery.PathFinder.find_spec(n, path) is not None)
    assert not shadowed, f"these names hide installed modules when run from the repo or bench/: {shadowed}"
