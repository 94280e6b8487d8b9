"""The package's import graph, read from its source with ast (imports inside functions included): no import points up
a floor, and no circle joins any two files. The floors, lowest first, as docs/design.md draws them."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "maskrcnn_jax"
FLOORS = (
    ("ops",),
    ("layers",),
    ("modeling", "data"),
    ("config", "engine"),
    ("serving",),
    ("evaluation",),
    ("train",),
    ("main", "predict", "export", "inference", "convert"),
)
FLOOR_OF = {part: level for level, parts in enumerate(FLOORS) for part in parts}


def module_name(path: pathlib.Path) -> str:
    parts = ("maskrcnn_jax",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: pathlib.Path, modules) -> set[str]:
    """The package modules that `name` imports, each resolved to the module file it names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("maskrcnn_jax.") and target != name:
                found.add(target)
    return found


def floor(name: str) -> int:
    return FLOOR_OF[name.split(".")[1]]


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items() if name != "maskrcnn_jax"}


def test_every_part_of_the_package_has_a_floor():
    assert {name.split(".")[1] for name in import_graph()} <= set(FLOOR_OF)


def test_no_import_points_up_a_floor():
    upward = [f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})"
              for name, targets in import_graph().items() for target in targets if floor(target) > floor(name)]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circles():
    graph = import_graph()
    state, circles = {}, []

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(circles)


@pytest.mark.parametrize("source, expected", [
    ("from maskrcnn_jax import train", {"maskrcnn_jax.train"}),
    ("from maskrcnn_jax.engine import parallel", {"maskrcnn_jax.engine", "maskrcnn_jax.engine.parallel"}),
    ("def f():\n    from maskrcnn_jax.evaluation.coco import coco_result", {"maskrcnn_jax.evaluation.coco"}),
    ("from . import parallel", {"maskrcnn_jax.engine", "maskrcnn_jax.engine.parallel"}),
])
def test_imports_are_resolved_to_files(tmp_path, source, expected):
    """The reader itself: absolute, function-level and relative imports all count (a package's __init__ runs too)."""
    path = tmp_path / "checkpointing.py"
    path.write_text(source)
    assert imports_of("maskrcnn_jax.engine.checkpointing", path, package_modules()) == expected
