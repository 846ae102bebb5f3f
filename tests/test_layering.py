"""The package's layers, read from its source: who may import whom.

    leaves (errors, version, hardware, options)  <  ir  <  channels  <  rules  <  passes  <  app

A module imports its own layer, lower layers and the leaves; nothing imports upward, no import
goes in a circle, and no package import hides inside a function (the old way to dodge a cycle).
Op knowledge lives in ``rules/``: an op-type test written elsewhere (``node.op == "Conv"``) is
counted, and each module may hold at most what ``OP_TESTS_ALLOWED`` grants it. No class is over
``CLASS_LINES`` lines. The allow-lists hold today's exceptions; they only ever shrink.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxslim_bn"
LEAVES = {"errors", "version", "hardware", "options"}
LAYERS = ["leaf", "ir", "channels", "rules", "passes", "app", "package"]
CLASS_LINES = 150

# module -> op-type tests it may still hold outside rules/ (each with its reason in the module)
OP_TESTS_ALLOWED: dict[str, int] = {
    "app.api": 2, "app.report": 2, "ir.fold": 7, "ir.interface": 1, "ir.shapes": 2, "passes.data_importance": 9,
    "passes.importance": 4, "passes.latency": 9, "passes.quantize": 4, "passes.reconstruct": 24, "passes.select.costs": 1,
    "passes.verify": 7,
}
# "module.Class" -> lines it may still have over CLASS_LINES
CLASSES_ALLOWED: dict[str, int] = {}
# (importer, imported) pairs that still go upward or sit inside a function
IMPORTS_ALLOWED: set[tuple[str, str]] = set()

OP_TEST = re.compile(r"\.op(?:_type)?\s*(?:==|!=|in\b|not in\b)\s*[(\[{\"']")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    if module == "" or module == "__main__":
        return LAYERS.index("package")
    head = module.split(".")[0]
    return LAYERS.index("leaf") if head in LEAVES else LAYERS.index(head)


def _targets(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement reads (its names that are modules, else the module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name == "onnxslim_bn" or a.name.startswith("onnxslim_bn.")]
        return [n[len("onnxslim_bn."):] if "." in n else "" for n in names]
    if node.level == 0:
        if not (node.module or "").startswith("onnxslim_bn"):
            return []
        base = node.module[len("onnxslim_bn."):] if "." in node.module else ""
    else:
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        here = [p for p in here if p]
        up = here[:len(here) - node.level + 1]
        base = ".".join(up + ([node.module] if node.module else []))
    subs = [f"{base}.{a.name}".lstrip(".") for a in node.names]
    found = [s for s in subs if s in MODULES]
    return found if len(found) == len(subs) else found + [base]


def _imports() -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every package import in the package."""
    out = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(i) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for i in ast.walk(n)}
        inner = {id(i) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for i in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                for target in _targets(module, path, node):
                    if target != module:
                        out.append((module, target, id(node) in inner))
    return out


def test_no_import_goes_upward():
    upward = sorted({(a, b) for a, b, _ in _imports() if layer(b) > layer(a)} - IMPORTS_ALLOWED)
    assert not upward, "imports from a higher layer: " + ", ".join(f"{a} -> {b}" for a, b in upward)


def test_no_package_import_inside_a_function():
    deferred = sorted({(a, b) for a, b, inside in _imports() if inside} - IMPORTS_ALLOWED)
    assert not deferred, "package imports inside functions: " + ", ".join(f"{a} -> {b}" for a, b in deferred)


def test_no_import_cycle():
    edges: dict[str, set[str]] = {}
    for a, b, _ in _imports():
        if b:  # the package root re-exports the API; importing it from inside is caught as upward
            edges.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_op_knowledge_lives_in_rules():
    over = {}
    for module, path in MODULES.items():
        if module.split(".")[0] == "rules":
            continue
        count = len(OP_TEST.findall(path.read_text(encoding="utf-8")))
        if count > OP_TESTS_ALLOWED.get(module, 0):
            over[module] = count
    assert not over, f"op-type tests outside rules/ (allowed {OP_TESTS_ALLOWED}): {over}"


def test_no_class_over_the_limit():
    over = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                name = f"{module}.{node.name}"
                if lines > CLASS_LINES + CLASSES_ALLOWED.get(name, 0):
                    over[name] = lines
    assert not over, f"classes over {CLASS_LINES} lines: {over}"


def test_the_checks_see_what_they_count(tmp_path):
    """The parser finds an upward import, a deferred one and an op test when they are there."""
    src = "def f(n):\n    from ..app import api\n    return n.op == 'Conv'\n"
    tree = ast.parse(src)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _targets("passes.verify", PACKAGE / "passes" / "verify.py", node) == ["app.api"]
    assert layer("app.api") > layer("passes.verify") > layer("rules.base") > layer("channels.layout") > layer("ir.shapes")
    assert layer("options") == layer("errors") < layer("ir.values")
    assert len(OP_TEST.findall(src)) == 1
