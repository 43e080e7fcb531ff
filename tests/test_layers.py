"""The package's import graph, read from the sources (ast; nothing imported): the layers import
downwards only and no module imports another module's private names.

Layers, lowest first: the ops (ops, schemas, _checks, _backend, _build, cuda_backend, distributed,
cpu/, triton_kernels/, and python_ref/), pruning/, then hf/ and models/, then the applications
(apps/ and __main__). A module may import from its own layer and the ones below. Every import counts, also one
inside a function: a lazy import is still a dependency. `from pkg import name` depends on the
module pkg.name when there is one, else on pkg; a package does not depend on its submodules'
parents (importing swiftvlm_kernels.hf.patch is no import of hf/__init__.py).

There are no known exceptions; KNOWN_PRIVATE and KNOWN_CYCLES stay as the place to list one, so that
no exception comes in unseen."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("swiftvlm_kernels", "python_ref")
OPS_LAYER = {"swiftvlm_kernels." + m for m in ("ops", "schemas", "_checks", "_backend", "_build", "cuda_backend",
                                                "distributed", "cpu", "triton_kernels")} | {"python_ref"}
APPS = {"swiftvlm_kernels." + m for m in ("apps", "__main__")}
# (importing module, what it uses): private names used across modules of the ops layer
KNOWN_PRIVATE: set = set()
# cycles among the applications, by the modules' last names (none left)
KNOWN_CYCLES: list = []
# layer -> the layers it must not import
FORBIDDEN = {
    "ops": {"pruning", "hf", "models", "apps"},
    "pruning": {"hf", "models", "apps"},
    "hf": {"apps"},
    "models": {"apps"},
}


def _modules() -> dict[str, Path]:
    """Every module of the packages that exist (a subpackage such as apps/ may not yet)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer(name: str) -> str:
    if any(_within(name, m) for m in OPS_LAYER):
        return "ops"
    if any(_within(name, m) for m in APPS):
        return "apps"
    for sub in ("pruning", "hf", "models"):
        if _within(name, "swiftvlm_kernels." + sub):
            return sub
    return "other"  # the package root


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


class Imports(ast.NodeVisitor):
    """One module's dependencies on the packages' modules, and its uses of others' private names."""

    def __init__(self, name: str, is_package: bool):
        self.name, self.package = name, name if is_package else name.rpartition(".")[0]
        self.edges: set[str] = set()
        self.private: list[tuple[str, str, int]] = []  # (this module, what it uses, line)
        self.aliases: dict[str, str] = {}  # local name -> the package module it is bound to

    def _depend(self, target: str, lineno: int, what: str) -> None:
        if target.split(".")[0] not in PACKAGES:
            return
        self.edges.add(target)
        parts = target.split(".")
        for i, part in enumerate(parts):  # a private module is its package's own
            if _is_private(part) and not _within(self.name, ".".join(parts[:i])):
                self.private.append((self.name, what, lineno))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._depend(alias.name, node.lineno, f"import {alias.name}")
            if alias.asname:
                self.aliases[alias.asname] = alias.name

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if full in MODULES:
                self._depend(full, node.lineno, f"from {source} import {alias.name}")
                self.aliases[alias.asname or alias.name] = full
            else:
                self._depend(source, node.lineno, f"from {source} import {alias.name}")
                if _is_private(alias.name) and source.split(".")[0] in PACKAGES:
                    self.private.append((self.name, alias.name, node.lineno))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases and _is_private(node.attr):
            module = self.aliases[node.value.id]
            if f"{module}.{node.attr}" in MODULES:
                self._depend(f"{module}.{node.attr}", node.lineno, f"{node.value.id}.{node.attr}")
            else:
                self.private.append((self.name, f"{node.value.id}.{node.attr}", node.lineno))
        self.generic_visit(node)


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    graph: dict[str, set[str]] = {}
    private: list[tuple[str, str, int]] = []
    for name, path in MODULES.items():
        visitor = Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), str(path)))
        graph[name] = {t for t in visitor.edges if t != name}
        private += visitor.private
    return graph, private


GRAPH, PRIVATE = _graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_covers_the_layers():
    assert {layer(m) for m in MODULES} >= {"ops", "pruning", "hf", "models"}
    assert "swiftvlm_kernels.pruning.engine" in GRAPH["swiftvlm_kernels.pruning.loop"]  # edges are read


@pytest.mark.parametrize("low", sorted(FORBIDDEN))
def test_layers_import_downwards_only(low):
    wrong = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if layer(m) == low
                   for t in targets if layer(t) in FORBIDDEN[low])
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    known = [c for c in _cycles(GRAPH) if {m.rpartition(".")[2] for m in c} in KNOWN_CYCLES]
    assert all(layer(m) == "apps" for c in known for m in c)
    assert [c for c in _cycles(GRAPH) if c not in known] == []


def test_no_module_imports_another_modules_private_names():
    wrong = [f"{m}:{line}: {what}" for m, what, line in PRIVATE if (m, what) not in KNOWN_PRIVATE]
    assert not wrong, "\n".join(wrong)
    assert all(layer(m) == "ops" for m, _ in KNOWN_PRIVATE)


def test_the_checker_sees_a_cycle_and_a_private_name():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    visitor = Imports("swiftvlm_kernels.models.x", False)
    visitor.visit(ast.parse("from ..pruning.plan import _secret\nfrom ..hf import _decoder\nfrom . import llava\n"
                            "llava._private_helper()\n"))
    assert len(visitor.private) == 3, visitor.private
    assert "swiftvlm_kernels.hf._decoder" in visitor.edges and "swiftvlm_kernels.pruning.plan" in visitor.edges


def test_the_pruning_profile_of_a_transformers_model_is_deprecated():
    """pruning.layer_profile no longer imports hf: it finds swiftvlm_kernels.hf at run time and warns."""
    from swiftvlm_kernels.pruning import layer_profile

    with pytest.warns(DeprecationWarning, match=r"call swiftvlm_kernels\.hf\.layer_profile"), \
            pytest.raises(ValueError, match="model: expected a supported transformers VLM"):
        layer_profile(object(), [], lambda sample, output: 0.0)
