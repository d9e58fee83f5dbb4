"""Dependencies point one way: an `ast` read of every project module's imports (docs/architecture.md).

Project modules are the `.py` files under trainer/ (with trainer/data/ and trainer/model/), embeddings/,
launch/ and cluster/; bench/ and tests/ are not. Every import counts: module level, inside functions and
classes, under `try:` and under `if TYPE_CHECKING:`. Rules:

- (a) no cycle between project files. An import under `if TYPE_CHECKING:` never runs, so it is left out of
  the cycle rule (that is what TYPE_CHECKING is for: annotating with a type from a module that imports you);
  every other import counts, function-level ones included, because they run and hide cycles.
- (b) trainer/, embeddings/ and cluster/ never import launch/ (nothing does: launch/ is the top).
- (c) trainer/data/ imports nothing else from the project (it is the leaf).
- (d) embeddings/ imports only trainer/data/ and embeddings/ itself.
The layer rules (b)-(d) count TYPE_CHECKING imports too: a type from a forbidden layer is still a dependency
on it.

Resolution: `import a.b.c` and `from a.b import c` name the most specific project file (`from trainer
import checkpoint` is an import of trainer/checkpoint.py; `from trainer.data.schema import DAY` of
trainer/data/schema.py); relative imports are resolved against the importing file's package. Parent
packages' `__init__.py` files that Python also runs are not counted as imported (a test below keeps them free
of project imports).

The checking is done by pure functions over a `{file: set(imported files)}` graph, tested below on small
synthetic graphs reproducing the problems issue #10 found, then applied to the real tree.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "embeddings", "launch", "cluster")

Graph = Mapping[str, Collection[str]]


# ----------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Import:
    target: str  # project file, e.g. "trainer/checkpoint.py"
    line: int
    type_checking: bool  # only under `if TYPE_CHECKING:` (never runs)


def module_files(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Dotted module name -> file path relative to root, for every project module."""
    out: dict[str, str] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = rel.as_posix()
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(tree: ast.AST):
    """Every Import/ImportFrom node anywhere in the tree, with whether it sits under `if TYPE_CHECKING:`."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, tc = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, tc
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            # the `else:` of `if TYPE_CHECKING:` does run; pushed in reverse so imports come out in source order
            stack.extend((child, tc) for child in reversed(node.orelse))
            stack.extend((child, True) for child in reversed(node.body))
        else:
            stack.extend((child, tc) for child in reversed(list(ast.iter_child_nodes(node))))


def _resolve(dotted: str, modules: Mapping[str, str]) -> str | None:
    """The most specific project module that `dotted` names (a.b.c, else a.b, else a), or None."""
    parts = dotted.split(".")
    while parts:
        name = ".".join(parts)
        if name in modules:
            return name
        parts.pop()
    return None


def imports_of(source: str, module: str, is_package: bool, modules: Mapping[str, str]) -> list[Import]:
    """The project files that `source` (the text of `module`) imports, resolved through `modules`."""
    out: list[Import] = []
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    for node, tc in _walk(tree):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [_resolve(alias.name, modules) for alias in node.names]
        else:
            if node.level:
                base_parts = package.split(".") if package else []
                if node.level - 1 > len(base_parts):
                    raise ImportError(f"{modules.get(module, module)}:{node.lineno}: relative import beyond top")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                if alias.name != "*" and full in modules:  # `from trainer import checkpoint`
                    targets.append(full)
                else:  # `from trainer.data.schema import DAY`
                    targets.append(_resolve(base, modules) if base else None)
        for t in targets:
            if t is not None and t != module:
                out.append(Import(modules[t], node.lineno, tc))
    return out


@functools.lru_cache(maxsize=None)
def project_imports(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, list[Import]]:
    """file -> the project imports it makes, for the whole tree under root (read once per session)."""
    modules = module_files(root, packages)
    out: dict[str, list[Import]] = {}
    for name, rel in modules.items():
        is_package = rel.endswith("__init__.py")
        out[rel] = imports_of((root / rel).read_text(), name, is_package, modules)
    return out


def graphs(imports: Mapping[str, list[Import]]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(runtime graph for the cycle rule, full graph for the layer rules) as {file: set(imported files)}."""
    runtime = {f: {i.target for i in imps if not i.type_checking} for f, imps in imports.items()}
    full = {f: {i.target for i in imps} for f, imps in imports.items()}
    return runtime, full


# ----------------------------------------------------------------------------------------------- rules


def _sccs(graph: Graph) -> list[list[str]]:
    """Strongly connected components (iterative Tarjan), each sorted, in sorted order."""
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return sorted(out)


def _shortest_path(graph: Graph, start: str, goal: str, within: set[str]) -> list[str] | None:
    """Breadth-first: the shortest path start -> ... -> goal using only nodes in `within`."""
    prev: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        v = queue.popleft()
        if v == goal:
            path = [v]
            while path[-1] != start:
                path.append(prev[path[-1]])
            return path[::-1]
        for w in sorted(graph.get(v, ())):
            if w in within and w not in seen:
                seen.add(w)
                prev[w] = v
                queue.append(w)
    return None


def find_cycles(graph: Graph) -> list[list[str]]:
    """Import cycles, as paths [a, b, ..., a]: for every import a -> b that lies on a cycle, the shortest cycle
    through it (duplicates removed), so each import that has to go is named in at least one reported path."""
    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for comp in _sccs(graph):
        members = set(comp)
        for u in comp:
            for v in sorted(graph.get(u, ())):
                if v not in members:
                    continue
                back = _shortest_path(graph, v, u, members)
                assert back is not None  # same strongly connected component
                ring = [u] + back[:-1] if v != u else [u]
                k = ring.index(min(ring))  # canonical rotation: start at the smallest name
                canon = tuple(ring[k:] + ring[:k])
                if canon not in seen:
                    seen.add(canon)
                    cycles.append(list(canon) + [canon[0]])
    return sorted(cycles)


def _in(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def layer_violations(graph: Graph) -> list[str]:
    """Breaches of rules (b)-(d), one readable line each."""
    out = []
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            if _in(dst, "launch") and not _in(src, "launch"):
                out.append(f"{src} imports {dst}: nothing outside launch/ may import launch/")
            if _in(src, "trainer/data") and not _in(dst, "trainer/data"):
                out.append(f"{src} imports {dst}: trainer/data/ is the leaf, it imports nothing else from the project")
            if _in(src, "embeddings") and not (_in(dst, "embeddings") or _in(dst, "trainer/data")):
                out.append(f"{src} imports {dst}: embeddings/ may import only trainer/data/ and itself")
    return out


def problems(runtime: Graph, full: Graph) -> list[str]:
    lines = [f"import cycle: {' -> '.join(c)}" for c in find_cycles(runtime)]
    return lines + layer_violations(full)


def _report(found: list[str]) -> str:
    return f"{len(found)} dependency problem(s) (see docs/architecture.md):\n  " + "\n  ".join(found)


# ----------------------------------------------------------------------------------------------- synthetic graphs


def test_train_finetune_cycle_is_reported():
    g = {
        "trainer/train.py": {"trainer/finetune.py", "trainer/engine.py"},
        "trainer/finetune.py": {"trainer/train.py"},
        "trainer/engine.py": set(),
    }
    assert find_cycles(g) == [["trainer/finetune.py", "trainer/train.py", "trainer/finetune.py"]]
    assert layer_violations(g) == []


def test_preflight_launch_cycle_and_layer_breach_are_reported():
    g = {
        "cluster/preflight.py": {"launch/cli.py", "launch/ray_launch.py", "cluster/planner.py"},
        "launch/cli.py": {"cluster/preflight.py"},
        "launch/ray_launch.py": {"cluster/preflight.py"},
        "cluster/planner.py": set(),
    }
    assert find_cycles(g) == [
        ["cluster/preflight.py", "launch/cli.py", "cluster/preflight.py"],
        ["cluster/preflight.py", "launch/ray_launch.py", "cluster/preflight.py"],
    ]
    found = layer_violations(g)
    assert found == [
        "cluster/preflight.py imports launch/cli.py: nothing outside launch/ may import launch/",
        "cluster/preflight.py imports launch/ray_launch.py: nothing outside launch/ may import launch/",
    ]


def test_todays_launch_tangle_names_every_import_on_a_cycle():
    # the shape on main before issue #10: preflight reaches ray_launch, which reaches back only through cli
    g = {
        "cluster/preflight.py": {"launch/cli.py", "launch/ray_launch.py"},
        "launch/cli.py": {"cluster/preflight.py", "launch/ray_launch.py", "launch/deepspeed_launch.py"},
        "launch/ray_launch.py": {"launch/cli.py", "trainer/train.py"},
        "launch/deepspeed_launch.py": {"launch/cli.py", "cluster/hostfile.py"},
        "trainer/train.py": set(),
        "cluster/hostfile.py": set(),
    }
    assert find_cycles(g) == [
        ["cluster/preflight.py", "launch/cli.py", "cluster/preflight.py"],
        ["cluster/preflight.py", "launch/ray_launch.py", "launch/cli.py", "cluster/preflight.py"],
        ["launch/cli.py", "launch/deepspeed_launch.py", "launch/cli.py"],
        ["launch/cli.py", "launch/ray_launch.py", "launch/cli.py"],
    ]


def test_launcher_cli_cycle_inside_launch_is_reported():
    g = {
        "launch/cli.py": {"launch/ray_launch.py", "launch/deepspeed_launch.py"},
        "launch/ray_launch.py": {"launch/cli.py"},
        "launch/deepspeed_launch.py": {"launch/cli.py"},
    }
    assert find_cycles(g) == [
        ["launch/cli.py", "launch/deepspeed_launch.py", "launch/cli.py"],
        ["launch/cli.py", "launch/ray_launch.py", "launch/cli.py"],
    ]
    assert layer_violations(g) == []  # launch/ importing launch/ is fine; the cycle is not


def test_longer_cycle_reports_its_path():
    g = {"trainer/a.py": {"trainer/b.py"}, "trainer/b.py": {"trainer/c.py"}, "trainer/c.py": {"trainer/a.py"}}
    assert find_cycles(g) == [["trainer/a.py", "trainer/b.py", "trainer/c.py", "trainer/a.py"]]


def test_embeddings_importing_model_is_reported():
    g = {
        "embeddings/interaction.py": {"trainer/model/encoder.py", "trainer/data/schema.py"},
        "embeddings/tables.py": {"embeddings/interaction.py", "trainer/data/batch.py"},
        "trainer/model/encoder.py": set(),
        "trainer/data/schema.py": set(),
        "trainer/data/batch.py": set(),
    }
    assert find_cycles(g) == []
    assert layer_violations(g) == [
        "embeddings/interaction.py imports trainer/model/encoder.py: embeddings/ may import only trainer/data/ "
        "and itself"
    ]


def test_data_importing_engine_is_reported():
    g = {
        "trainer/data/loader.py": {"trainer/engine.py", "trainer/data/schema.py"},
        "trainer/data/schema.py": set(),
        "trainer/engine.py": {"trainer/data/loader.py"},
    }
    assert find_cycles(g) == [["trainer/data/loader.py", "trainer/engine.py", "trainer/data/loader.py"]]
    assert layer_violations(g) == [
        "trainer/data/loader.py imports trainer/engine.py: trainer/data/ is the leaf, it imports nothing else "
        "from the project"
    ]


def test_trainer_and_embeddings_importing_launch_are_reported():
    g = {"trainer/job.py": {"launch/cli.py"}, "embeddings/tables.py": {"launch/cli.py"}, "launch/cli.py": set()}
    assert layer_violations(g) == [
        "embeddings/tables.py imports launch/cli.py: nothing outside launch/ may import launch/",
        "embeddings/tables.py imports launch/cli.py: embeddings/ may import only trainer/data/ and itself",
        "trainer/job.py imports launch/cli.py: nothing outside launch/ may import launch/",
    ]


def test_graph_following_the_rules_passes():
    g = {
        "launch/cli.py": {"launch/train_cmd.py", "cluster/planner.py", "trainer/job.py"},
        "launch/train_cmd.py": {"trainer/run.py", "trainer/job.py"},
        "cluster/planner.py": {"trainer/job.py", "trainer/model/build.py", "embeddings/sharding.py"},
        "trainer/run.py": {"trainer/train.py", "trainer/finetune.py"},
        "trainer/train.py": {"trainer/engine.py", "trainer/checkpoint.py"},
        "trainer/finetune.py": {"trainer/engine.py", "trainer/checkpoint.py"},
        "trainer/engine.py": {"trainer/model/build.py", "embeddings/tables.py", "trainer/data/loader.py"},
        "trainer/checkpoint.py": {"trainer/model/build.py"},
        "trainer/model/build.py": {"trainer/job.py", "trainer/model/interaction.py"},
        "trainer/model/interaction.py": {"trainer/data/schema.py"},
        "trainer/job.py": {"trainer/data/schema.py"},
        "embeddings/tables.py": {"embeddings/sharding.py", "trainer/data/schema.py"},
        "embeddings/sharding.py": set(),
        "trainer/data/loader.py": {"trainer/data/schema.py"},
        "trainer/data/schema.py": set(),
    }
    assert problems(g, g) == []


# ----------------------------------------------------------------------------------------------- parsing

_MODULES = {
    name: name.replace(".", "/") + ".py"
    for name in (
        "trainer.train",
        "trainer.finetune",
        "trainer.checkpoint",
        "trainer.job",
        "trainer.data.schema",
        "trainer.data.batch",
        "launch.cli",
        "cluster.preflight",
    )
}
_MODULES.update(
    {"trainer": "trainer/__init__.py", "trainer.data": "trainer/data/__init__.py", "launch": "launch/__init__.py"}
)


def test_imports_are_resolved_to_files():
    src = """
from __future__ import annotations
import os
from typing import TYPE_CHECKING
import trainer.data.schema as schema
from trainer import checkpoint
from trainer.job import JobConfig
from . import finetune
from .data import batch
from .data.schema import DAY

if TYPE_CHECKING:
    from launch.cli import Parser
else:
    pass

def run():
    import numpy
    from launch import cli
    try:
        from trainer.data.nothing_here import x   # resolves to trainer/data/__init__.py
    except ImportError:
        pass
"""
    got = {(i.target, i.type_checking) for i in imports_of(src, "trainer.train", False, _MODULES)}
    assert got == {
        ("trainer/data/schema.py", False),
        ("trainer/checkpoint.py", False),
        ("trainer/job.py", False),
        ("trainer/finetune.py", False),
        ("trainer/data/batch.py", False),
        ("launch/cli.py", True),
        ("launch/cli.py", False),
        ("trainer/data/__init__.py", False),
    }


def test_type_checking_imports_count_for_layers_not_cycles():
    imports = {
        "trainer/train.py": imports_of(
            "import typing\nif typing.TYPE_CHECKING:\n    import trainer.finetune\n", "trainer.train", False, _MODULES
        ),
        "trainer/finetune.py": imports_of(
            "def f():\n    from trainer import train\n", "trainer.finetune", False, _MODULES
        ),
        "trainer/job.py": imports_of(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from launch.cli import X\n",
            "trainer.job",
            False,
            _MODULES,
        ),
    }
    runtime, full = graphs(imports)
    assert find_cycles(runtime) == []
    assert find_cycles(full) == [["trainer/finetune.py", "trainer/train.py", "trainer/finetune.py"]]
    assert layer_violations(full) == [
        "trainer/job.py imports launch/cli.py: nothing outside launch/ may import launch/"
    ]


def test_relative_import_in_package_init():
    mods = {
        "trainer.data": "trainer/data/__init__.py",
        "trainer.data.schema": "trainer/data/schema.py",
        "trainer": "trainer/__init__.py",
        "trainer.job": "trainer/job.py",
    }
    got = [i.target for i in imports_of("from . import schema\nfrom ..job import X\n", "trainer.data", True, mods)]
    assert got == ["trainer/data/schema.py", "trainer/job.py"]


# ----------------------------------------------------------------------------------------------- the real tree


def test_project_tree_follows_the_import_rules():
    imports = project_imports()
    assert "trainer/train.py" in imports and "trainer/data/schema.py" in imports  # found the tree
    found = problems(*graphs(imports))
    if found:  # name each offending import's line, for the one who has to fix it
        where = {}
        for src, imps in imports.items():
            for i in imps:
                where.setdefault((src, i.target), set()).add(i.line)
        detail = [
            f"{s} line {','.join(map(str, sorted(ls)))} -> {t}"
            for (s, t), ls in sorted(where.items())
            if any(f"{s} -> {t}" in p or p.startswith(f"{s} imports {t}:") for p in found)
        ]
        raise AssertionError(_report(found) + "\nthe imports involved:\n  " + "\n  ".join(detail))


def test_package_inits_import_nothing_from_the_project():
    # why importing trainer/data/schema.py need not count as importing trainer/__init__.py and trainer/data/__init__.py
    busy = {
        f: sorted({i.target for i in imps})
        for f, imps in project_imports().items()
        if f.endswith("__init__.py") and imps
    }
    assert busy == {}, f"package __init__.py files that import project modules: {busy}"
