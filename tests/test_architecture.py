"""The import graph of `minilora/`: every chapter builds on earlier chapters, never on a later one.

Each module under minilora/ is parsed with `ast`, not imported, and every import statement in it counts:
module level, inside functions (a lazy import is still a dependency, only a later one), and under
`if TYPE_CHECKING:`, in all their spellings (`import minilora.x`, `from minilora.x import f`,
`from minilora import x`, relative imports, `importlib.import_module("minilora.x")` with a literal name).
`from package import name` is an edge to the module `package.name` when that is a module, else to the
package itself (whose `__init__.py` defines or re-exports the name).

An edge names the module the statement names. That Python runs the parent packages' `__init__.py` first
(`minilora/__init__.py` for any `minilora.x`) is not counted: `minilora/__init__.py` is the package's face,
it imports every chapter, and it sits after all of them.

The rules (ARCHITECTURE.md explains them):
  * the library's modules are in CHAPTER_ORDER, and a module imports only modules listed before it;
  * so the library's graph has no cycle (checked on its own too, to name the circle if one appears);
  * the course kit (`minilora.course`, and `minilora.check`, the checker's old command name) may import
    anything; nothing in the library imports it, nor the benchmark (`bench/`), the tests or the tools.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minilora"

# The library in chapter order (README's chapter table); each module may import only those above it.
CHAPTER_ORDER: tuple[str, ...] = (
    "minilora.profiling",  # 0  how every figure is measured
    "minilora.memory",  # 0  bytes of fine-tuning
    "minilora.lora",  # 2  the LoRA layer
    "minilora.inject",  # 3  adapters into a model
    "minilora.io",  # 3  adapter files in PEFT's format
    "minilora.nf4",  # 4  4-bit NormalFloat
    "minilora.double_quant",  # 5  8-bit block scales
    "minilora.bnb",  # 5  the bitsandbytes boundary (conversion, its CPU dequantizers)
    "minilora.qlora",  # 6  LinearNF4, quantize_model
    "minilora.paged",  # 7  PagedAdamW
    "minilora.dora",  # 8  DoRA, plugged into the LoRA layer as a variant
    "minilora.loraplus",  # 9  LoRA+ parameter groups
    "minilora.kernels.nf4",  # 10 Triton: NF4 (de)quantization, the 8-bit step of double quantization
    "minilora.kernels.lora_weight",  # 10 Triton: W' = W0 + s·B A, row norms, column dot products
    "minilora.kernels.ops",  # 10 the kernels as torch.ops.minilora operators, for torch.compile
    "minilora.kernels",  # 10 the dispatchers: Triton on CUDA, the chapters' PyTorch elsewhere
    "minilora.fast",  # 10 fused layers, plugged into the LoRA layer as its fused forward
    "minilora.adalora",  # 12 AdaLoRA: SVD-form update, importance, rank budget
    "minilora.adapters",  # 12 bottleneck adapters and prefix tuning
    "minilora.distributed",  # 13 DDP and FSDP2: the 4-bit weight sharded as bytes, adapter files from ranks
    "minilora",  # the package's face: imports every chapter, so every plug-in is installed
)

# Above the library: may import anything, imported by nothing in it.
COURSE_KIT: tuple[str, ...] = ("minilora.course", "minilora.check")
# Outside the package: the library never imports these.
OUTSIDE: tuple[str, ...] = ("bench", "tests", "tools", "course", "solutions", "exercises")

# (importer, imported) -> why this arrow to a later chapter is allowed (ARCHITECTURE.md says it too).
ALLOWED_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("minilora.qlora", "minilora.kernels"): (
        "LinearNF4 is the layer QLoRA trains with, and on a GPU it must dequantize with the Triton kernel. It "
        "calls the dispatchers `kernels.quantize` / `kernels.dequantize` by name, looked up at each call, so a "
        "reader sees which function runs and chapter 6 can count its calls by patching `kernels.dequantize`; "
        "on a CPU they are chapter 4's functions. No circle: nothing under kernels/ imports qlora."
    ),
}


@dataclass(frozen=True)
class Import:
    """One import statement's target: `module` imports `target` at `line` (lazy: inside a function)."""

    module: str
    target: str
    line: int
    lazy: bool


def module_name(path: Path) -> str:
    """minilora/kernels/__init__.py -> minilora.kernels; minilora/lora.py -> minilora.lora."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of `from <level dots><name> import ...` written in `module`."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_lazy(parents: list[ast.AST]) -> bool:
    return any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) for p in parents)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import in `source` (the text of `module`), resolved to module names where `known` has them."""
    found: list[Import] = []

    def add(target: str, node: ast.AST, parents: list[ast.AST]) -> None:
        found.append(Import(module, target, node.lineno, _is_lazy(parents)))

    def visit(node: ast.AST, parents: list[ast.AST]) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, parents)
        elif isinstance(node, ast.ImportFrom):
            source_module = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                             else node.module or "")
            for alias in node.names:
                submodule = f"{source_module}.{alias.name}"
                add(submodule if submodule in known else source_module, node, parents)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node, parents)
        for child in ast.iter_child_nodes(node):
            visit(child, parents + [node])

    visit(ast.parse(source), [])
    return found


def _owner(target: str, names: set[str] | tuple[str, ...]) -> str | None:
    """The longest of `names` that is `target` or a package above it."""
    hits = [n for n in names if target == n or target.startswith(n + ".")]
    return max(hits, key=len) if hits else None


def is_course_kit(name: str) -> bool:
    return _owner(name, COURSE_KIT) is not None


def all_imports() -> list[Import]:
    modules = package_modules()
    known = set(modules)
    edges = []
    for name, path in modules.items():
        edges += imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
    return edges


def library_edges() -> list[Import]:
    """Imports from a library module to a library module (the course kit and third-party code left out),
    one per statement and target."""
    library = set(CHAPTER_ORDER)
    edges: dict[tuple[str, str, int], Import] = {}
    for imp in all_imports():
        if is_course_kit(imp.module) or imp.module not in library:
            continue
        target = _owner(imp.target, library)
        if target is not None and not is_course_kit(imp.target) and target != imp.module:
            edges.setdefault((imp.module, target, imp.line), Import(imp.module, target, imp.line, imp.lazy))
    return list(edges.values())


def _where(imp: Import) -> str:
    return f"{imp.module} -> {imp.target} (line {imp.line}{', inside a function' if imp.lazy else ''})"


def find_cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a list of modules."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.module, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


# ---------------------------------------------------------------------------------------------------------


def test_the_parser_sees_every_kind_of_import() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import minilora.nf4\n"
        "from minilora import kernels, LoRALinear\n"
        "from .dora import row_norm\n"
        "if TYPE_CHECKING:\n"
        "    from minilora.qlora import LinearNF4\n"
        "def f():\n"
        "    from minilora.fast import fused_forward\n"
        "    return importlib.import_module('minilora.paged')\n"
    )
    known = {"minilora", "minilora.nf4", "minilora.kernels", "minilora.dora", "minilora.qlora", "minilora.fast",
             "minilora.paged", "minilora.lora"}
    found = {(i.target, i.lazy) for i in imports_of(source, "minilora.lora", False, known)}
    assert {("minilora.nf4", False), ("minilora.kernels", False), ("minilora", False), ("minilora.dora", False),
            ("minilora.qlora", False), ("minilora.fast", True), ("minilora.paged", True)} <= found


def test_every_library_module_has_a_place_in_the_chapter_order() -> None:
    modules = set(package_modules())
    unplaced = sorted(m for m in modules if not is_course_kit(m) and m not in CHAPTER_ORDER)
    assert not unplaced, (f"{unplaced} are not in CHAPTER_ORDER: give each its chapter here and in "
                          "ARCHITECTURE.md")
    missing = sorted(set(CHAPTER_ORDER) - modules)
    assert not missing, f"CHAPTER_ORDER names modules that do not exist: {missing}"


def test_no_import_of_a_later_chapter() -> None:
    rank = {name: i for i, name in enumerate(CHAPTER_ORDER)}
    backward = [e for e in library_edges()
                if rank[e.target] > rank[e.module] and (e.module, e.target) not in ALLOWED_EXCEPTIONS]
    assert not backward, ("imports of a later chapter's module (let the later module plug into the earlier "
                          "one instead; see ARCHITECTURE.md):\n  " + "\n  ".join(map(_where, backward)))


def test_the_library_has_no_import_cycle() -> None:
    edges = library_edges()
    cycles = find_cycles(edges)
    detail = [f"{' <-> '.join(c)}: " + "; ".join(_where(e) for e in edges if e.module in c and e.target in c)
              for c in cycles]
    assert not cycles, "import cycles:\n  " + "\n  ".join(detail)


def test_the_library_imports_neither_the_course_kit_nor_what_lies_outside_the_package() -> None:
    bad = [i for i in all_imports() if not is_course_kit(i.module)
           and (is_course_kit(i.target) or _owner(i.target, OUTSIDE) is not None)]
    assert not bad, "the library imports the course kit or code outside it:\n  " + "\n  ".join(map(_where, bad))


def test_allowed_exceptions_are_real_and_explained() -> None:
    edges = {(e.module, e.target) for e in library_edges()}
    for pair, reason in ALLOWED_EXCEPTIONS.items():
        assert pair in edges, f"ALLOWED_EXCEPTIONS lists {pair}, which no longer exists: remove it"
        assert len(reason) > 20, f"say why {pair} is allowed"


@pytest.mark.parametrize("name", CHAPTER_ORDER[:-1])
def test_architecture_doc_names_every_module(name: str) -> None:
    doc = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    short = name.removeprefix("minilora.").replace(".", "/")
    assert f"`{short}" in doc, f"ARCHITECTURE.md does not mention {name} (as `{short}`)"
