"""The shape of the code: the layers of ../DESIGN.md (nothing imports upward), no import cycle, no private
name imported across subpackages, no file in src/ over 400 lines; the paper's reproduction (paper/) uses bmrs's
public names only and bmrs never imports it.  Read from the source with ``ast``: nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PAPER = ROOT / "paper"
MAX_LINES = 400

# The layers, bottom up (DESIGN.md "Layers of the code"): a module may import from its own layer and those
# below, never from one above, at module level or inside a function.
LAYERS = [
    {"errors", "defaults", "io", "extras", "_compile", "_kernels"},  # the foundation: no torch model code
    {"distributions"},
    {"evidence", "reduction"},
    {"nn"},
    {"criteria"},
    {"pruning", "compaction", "inference"},
    {"data", "models", "saving"},  # (bmrs.load builds a saved network from its builder: saving uses models)
    {"training"},
    {"experiments"},
    {"cli"},
    {"__main__", "integrations"},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}

# Known breaches, each with the issue that removes it: (importer, imported).
ALLOWED_UPWARD: set[tuple[str, str]] = set()  # (none now)
# Files over MAX_LINES being split by their owners: path relative to src/ → the issue.
ALLOWED_LONG: dict[str, str] = {}  # (none now)


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name → (path, is a package's __init__) for every module under src/bmrs."""
    found = {}
    for path in sorted((SRC / "bmrs").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """The import statements that run when the module is imported (not those in functions, nor under
    ``if TYPE_CHECKING:``)."""
    out = []

    def visit(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return out


def _targets(name: str, is_package: bool, node) -> list[tuple[str, str | None]]:
    """(bmrs module imported, name taken from it or None) for one import statement of module ``name``."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "bmrs"]
    if node.level:
        base = (name if is_package else name.rpartition(".")[0]).split(".")
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != "bmrs":
        return []
    out = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.append((sub, None) if sub in MODULES else (source, alias.name))
    return out


def _imports(module_level: bool) -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, name taken or None, line) over src/bmrs."""
    edges = []
    for name, (path, is_package) in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = _module_level(tree) if module_level else [
            n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in nodes:
            for target, taken in _targets(name, is_package, node):
                while target not in MODULES and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    edges.append((name, target, taken, node.lineno))
    return edges


def _part(module: str) -> str | None:
    """The subpackage or top-level module of ``bmrs.x.y``: ``x`` (None for the package ``bmrs`` itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(name) for name in MODULES} - {None}
    assert not parts - set(RANK), f"add these to LAYERS: {sorted(parts - set(RANK))}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = sorted({(a, b, line) for a, b, _, line in _imports(module_level=False)
                     if _part(a) and _part(b) and RANK[_part(b)] > RANK[_part(a)]})
    unexpected = [f"{a}:{line} imports {b}" for a, b, line in upward if (a, b) not in ALLOWED_UPWARD]
    assert not unexpected, "upward imports (see LAYERS):\n" + "\n".join(unexpected)
    stale = ALLOWED_UPWARD - {(a, b) for a, b, _ in upward}
    assert not stale, f"these breaches are gone: remove them from ALLOWED_UPWARD: {sorted(stale)}"


def test_no_import_cycle_at_module_level():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for a, b, _, _ in _imports(module_level=True):
        graph[a].add(b)
    # Tarjan's strongly connected components: a component of two or more modules is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_is_imported_from_another_subpackage():
    """``from bmrs.x.m import _name`` only inside ``bmrs.x`` (private modules such as ``_kernels`` are the
    library's own and may be imported anywhere in it; a private function or class may not)."""
    found = sorted({f"{a}:{line} takes {b}.{taken}" for a, b, taken, line in _imports(module_level=False)
                    if taken and taken.startswith("_") and not taken.startswith("__") and _part(a) != _part(b)})
    assert not found, "private names used across subpackages:\n" + "\n".join(found)


SOURCES = sorted(p.relative_to(SRC).as_posix() for p in (SRC / "bmrs").rglob("*")
                 if p.suffix in (".py", ".cpp", ".h") and "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", [path for path in SOURCES if path not in ALLOWED_LONG])
def test_no_source_file_is_over_the_line_limit(path):
    lines = len((SRC / path).read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path}: {lines} lines (at most {MAX_LINES}); split it by job"


def test_the_allowed_long_files_are_still_long():
    """An entry of ALLOWED_LONG goes once its file is split."""
    short = [path for path in ALLOWED_LONG
             if not (SRC / path).exists() or len((SRC / path).read_text(encoding="utf-8").splitlines()) <= MAX_LINES]
    assert not short, f"remove from ALLOWED_LONG: {short}"


def test_the_rules_see_a_breach():
    """The walk finds imports at all (a broken resolver would pass every rule above)."""
    edges = {(a, b) for a, b, _, _ in _imports(module_level=True)}
    assert ("bmrs.nn.attach", "bmrs.nn.placement") in edges
    assert ("bmrs.compaction.fold", "bmrs.nn.attach") in edges
    assert RANK[_part("bmrs.compaction.fold")] > RANK[_part("bmrs.nn.attach")]


def test_the_criteria_registry_agrees_with_the_classes():
    """bmrs.defaults.CRITERION_RULES (torch-free: the CLI's choices) names exactly the classes of
    bmrs.criteria.CRITERIA, and says of each whether it has a rule of its own and takes a threshold."""
    import inspect

    from bmrs import defaults
    from bmrs.criteria import CRITERIA

    assert set(CRITERIA) == set(defaults.CRITERION_RULES) == set(defaults.CRITERION_NAMES) - {"none"}
    for name, cls in CRITERIA.items():
        rule = defaults.CRITERION_RULES[name]
        assert cls.name == name
        assert cls().has_rule == (rule != "ranking"), name
        assert ("threshold" in inspect.signature(cls).parameters) == (rule == "threshold"), name


def _absolute_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every absolute import in ``path``, at any level."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out += [(node.module, alias.name, node.lineno) for alias in node.names]
    return out


def test_the_installed_package_never_imports_the_paper():
    """paper/ is not installed (pyproject finds packages under src/ only), so an import of it from bmrs would
    work in a checkout and fail for every user."""
    import tomllib

    found = [f"{path.relative_to(SRC)}:{line} imports {module}" for path in sorted((SRC / "bmrs").rglob("*.py"))
             for module, _, line in _absolute_imports(path) if module.split(".")[0] == "paper"]
    assert not found, "bmrs imports the paper's reproduction:\n" + "\n".join(found)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]


def test_the_paper_uses_only_public_bmrs_names():
    """``from bmrs.x import _name`` or ``import bmrs._x`` in paper/ would tie the reproduction to internals."""
    edges = [(path.relative_to(ROOT).as_posix(), module, taken, line) for path in sorted(PAPER.glob("*.py"))
             for module, taken, line in _absolute_imports(path) if module.split(".")[0] == "bmrs"]
    assert ("paper/runs.py", "bmrs.training", "TrainConfig") in {e[:3] for e in edges}  # (the walk sees them)
    private = [f"{path}:{line} takes {module}" + (f".{taken}" if taken else "") for path, module, taken, line in edges
               if any(part.startswith("_") for part in module.split("."))
               or (taken and taken.startswith("_") and not taken.startswith("__"))]
    assert not private, "private bmrs names used by paper/:\n" + "\n".join(private)


def test_constants_shared_with_the_kernels_have_one_source():
    # bmrs/_kernels/constants.py generates bmrs_constants.h; no kernel source defines one of its names again,
    # and every name the header defines is used by a kernel source
    import re

    from bmrs._kernels.constants import header_text

    names = re.findall(r"constexpr \w+ (k\w+)(?:\[\])? =", header_text())
    assert names
    sources = {p.name: p.read_text() for p in (SRC / "bmrs" / "_kernels").iterdir() if p.suffix in (".h", ".cpp")}
    for name in names:
        redefined = [f for f, text in sources.items() if re.search(rf"constexpr \w+ {name}(\[\])? =", text)]
        assert not redefined, f"{name} is defined again in {redefined}: take it from bmrs_constants.h"
        assert any(re.search(rf"\b{name}\b", text) for text in sources.values()), f"{name} is never used"
