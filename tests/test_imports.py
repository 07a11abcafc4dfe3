"""The package's dependency graph: no import circles (counting imports inside functions), own-module imports at the
top of each file except where a light command needs them late, and `validate` and `status` without torch (and
`validate` without h5py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hpcrender"

# Files allowed to import their own package's modules inside functions, and why.
LATE_IMPORTS = {
    "hpcrender.cli": "each command imports what needs torch, diffusers or h5py itself: validate and status stay light",
    "hpcrender.models": "the loaders import torch: a model reference or config is read without them",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> list[tuple[str, bool]]:
    """(imported own module, inside a function?) for every import statement of module `name`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "hpcrender" and target in MODULES:
                found.append((target, id(node) not in top and not _under_type_checking(tree, node)))
    return found


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for block in tree.body:
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING":
            if any(child is node for child in ast.walk(block)):
                return True
    return False


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (or a module importing itself), by Tarjan."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_circles_and_only_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_module_imports_itself_back_even_inside_functions():
    graph = {name: {target for target, _ in imports_of(name)} for name in MODULES}
    assert sum(len(v) for v in graph.values()) > 100  # the walk sees the package's imports
    assert cycles(graph) == []


def test_own_modules_are_imported_at_the_top_except_where_a_light_command_needs_them_late():
    late = {name: sorted({t for t, inside in imports_of(name) if inside}) for name in MODULES}
    late = {name: targets for name, targets in late.items() if targets}
    assert set(late) == set(LATE_IMPORTS), late


LIGHT = """
import sys
from hpcrender.cli import cli
command = sys.argv[1:]
if command[0] == "status":
    from hpcrender.output.records import merge_status
    merge_status(__import__("pathlib").Path(command[1]), ["harbor"])
try:
    cli.main(args=command, prog_name="hpcrender", standalone_mode=False)
except SystemExit:
    pass
print(sorted(m for m in ("torch", "diffusers", "transformers", "h5py") if m in sys.modules))
"""


# status reads the stores' superblocks (a store a killed writer left marked open), so it loads h5py.
@pytest.mark.parametrize("command, loaded", [("validate", "[]"), ("status", "['h5py']")])
def test_light_commands_do_not_import_torch_or_diffusers(tmp_path, command, loaded):
    args = [str(PACKAGE.parent / "jobs" / "demo.toml")] if command == "validate" else [str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", LIGHT, command, *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == loaded, done.stdout + done.stderr
