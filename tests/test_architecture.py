"""The layout README's Layout draws: dpaat_core's parts sit on floors and import only downward, no module imports
another in a circle (imports inside functions included), the library never imports the CLI or Streamlit, and no
file patches ``sys.path`` (the project installs as a package)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dpaat_core"

# Bottom to top. A part may import its own floor's siblings only where the pair is listed in SIDEWAYS, and any
# floor below. A new module goes onto a floor here, in the same commit.
FLOORS = (
    ("errors",),
    ("models",),
    ("config",),
    ("data",),
    ("attack", "store"),
    ("train",),
    ("evaluate",),
    ("plots", "preview", "sweep"),
    ("report",),
    ("cli",),
    ("__main__",),
)
SIDEWAYS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The dpaat_core modules ``path`` imports, anywhere in the file (top level or inside a function)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dpaat_core")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("dpaat_core"):
                continue
            for alias in node.names:            # ``from dpaat_core.store import runs`` imports the module runs
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, set(known)) for name, path in known.items()}


def part(module: str) -> str:
    """The floor-plan unit of a module: its subpackage, or the top-level module itself."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "dpaat_core"


def test_every_module_sits_on_a_floor():
    floor_of = {p: i for i, floor in enumerate(FLOORS) for p in floor}
    unplaced = sorted({part(m) for m in modules()} - set(floor_of) - {"dpaat_core"})
    assert not unplaced, f"put these on a floor in FLOORS (and in README's Layout): {unplaced}"


def test_no_module_imports_in_a_circle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_parts_import_only_downward():
    floor_of = {p: i for i, floor in enumerate(FLOORS) for p in floor}
    floor_of["dpaat_core"] = -1                      # the package's __init__ (its version) is below everything
    upward = sorted((a, b) for a, targets in graph().items() for b in targets
                    if part(a) != part(b) and floor_of[part(b)] >= floor_of[part(a)]
                    and (part(a), part(b)) not in SIDEWAYS)
    assert not upward, "imports that point up or sideways: " + ", ".join(f"{a} -> {b}" for a, b in upward)


def test_the_library_never_imports_the_cli_or_streamlit():
    edges = graph()
    library = [m for m in edges if part(m) not in ("cli", "__main__")]
    assert not [m for m in library if any(part(t) == "cli" for t in edges[m])]
    for name in library:
        tree = ast.parse(modules()[name].read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {n for n in names if n.split(".")[0] == "streamlit"}, name


@pytest.mark.parametrize("folder", ["dpaat_core", "dashboard", "bench", "tests"])
def test_no_file_patches_sys_path(folder):
    patched = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")
               if any(isinstance(n, ast.Attribute) and n.attr in ("insert", "append") and isinstance(n.value, ast.Attribute)
                      and n.value.attr == "path" and getattr(n.value.value, "id", None) == "sys"
                      for n in ast.walk(ast.parse(p.read_text())))]
    assert not patched, f"sys.path patched in {patched}: import the installed package instead"


def test_the_graph_reader_sees_real_edges():
    """The checks above are only as good as the reader: it must see top-level, inner and module imports."""
    edges = graph()
    assert "dpaat_core.store.runs" in edges["dpaat_core.train.loop"]           # from dpaat_core.store import runs
    assert "dpaat_core.attack.attacks" in edges["dpaat_core.evaluate.robustness"]
    assert "dpaat_core.data" in edges["dpaat_core.store.runs"]                 # an import inside a function
