"""docs/architecture.md's import table is true: every ``dvidetl`` import of every module
(module level and function local, parsed with ``ast``) is allowed for its package, and no
two modules import each other in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dvidetl"


def _modname(p: Path) -> str:
    parts = list(p.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _walk(tree: ast.AST, runtime: bool):
    """``ast.walk``, leaving out ``if TYPE_CHECKING:`` blocks when ``runtime`` (imports the
    type checker alone follows)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if runtime and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _imports(runtime: bool = False) -> dict[str, set[str]]:
    """module -> the dvidetl modules it imports (``from X import name``: X, or X.name when
    that is a module); ``runtime``: without the imports made for the type checker only."""
    mods = {_modname(p): p for p in PKG.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for m, p in mods.items():
        deps: set[str] = set()
        for node in _walk(ast.parse(p.read_text()), runtime):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "dvidetl"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "dvidetl":
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in mods else node.module)
        out[m] = deps
    return out


def _table() -> dict[str, set[str]]:
    """package -> allowed imports, from the table under 'Which imports are allowed'."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Which imports are allowed", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        allowed = set(re.findall(r"`([^`]+)`", cells[1]))
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = allowed
    return rows


def _unit(module: str, table: dict) -> str | None:
    """The table row a module belongs to: the longest listed prefix of its name."""
    rel = module.removeprefix("dvidetl.") if module != "dvidetl" else "dvidetl"
    parts = rel.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in table:
            return ".".join(parts[:i])
    return None


def _violations(imports: dict[str, set[str]], table: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(imports.items()):
        unit = _unit(m, table)
        if unit is None:
            bad.append(f"{m} is in no row of docs/architecture.md's import table")
            continue
        allowed = table[unit]
        if "*" in allowed:
            continue
        for d in sorted(deps):
            target = _unit(d, table)
            if target == unit or target in allowed:
                continue
            bad.append(f"{m} imports {d} ({target}), not allowed for {unit}")
    return bad


def test_every_import_is_in_the_architecture_table():
    table = _table()
    assert {"codec", "sources", "flight", "export", "sinks", "read", "tables", "cluster"} <= set(table)
    bad = _violations(_imports(), table)
    assert not bad, "\n".join(bad)


def test_no_import_circles_between_modules():
    """No module imports one that imports it back, when the program runs (a type-only import
    of a module that imports this one is no circle: it is never executed)."""
    graph = _imports(runtime=True)
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d not in graph or d == m:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_type_only_imports_are_told_apart():
    """The circle check leaves out exactly the ``if TYPE_CHECKING:`` imports (the table
    check keeps them: a type-only import is still a dependency to declare)."""
    every, runtime = _imports(), _imports(runtime=True)
    assert "dvidetl.export.endpoint" in every["dvidetl.export.tasks"]
    assert "dvidetl.export.endpoint" not in runtime["dvidetl.export.tasks"]
    assert runtime["dvidetl.export.tasks"] < every["dvidetl.export.tasks"]
    assert runtime["dvidetl.sinks.parquet"] <= every["dvidetl.sinks.parquet"]


def test_the_checker_finds_a_forbidden_import():
    """The check is not vacuous: a codec module importing a sink, a sink importing the
    driver, and a module in no row are each reported; allowed imports are not."""
    table = _table()
    graph = {"dvidetl.codec.block": {"dvidetl.sinks.parquet", "dvidetl.geometry"},
             "dvidetl.sinks.vastdb": {"dvidetl.export.driver", "dvidetl.export.kinds"},
             "dvidetl.nowhere": set()}
    assert _violations(graph, table) == [
        "dvidetl.codec.block imports dvidetl.sinks.parquet (sinks), not allowed for codec",
        "dvidetl.nowhere is in no row of docs/architecture.md's import table",
        "dvidetl.sinks.vastdb imports dvidetl.export.driver (export), not allowed for sinks"]


def _imported_names(paths) -> dict[str, set[str]]:
    """file (relative) -> ``module.name`` of every ``from dvidetl... import name`` in it."""
    out: dict[str, set[str]] = {}
    for p in paths:
        names = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dvidetl"):
                names |= {f"{node.module}.{a.name}" for a in node.names}
        out[str(p.relative_to(ROOT))] = names
    return out


def _assemblers(imported: dict[str, set[str]]) -> list[str]:
    """Files that run an export's partitions themselves (``export.driver.execute``) outside
    the library API (``export.api``) and verify's ``--repair`` (which re-exports the bad
    partitions of a run that exists)."""
    allowed = {"dvidetl/export/api.py", "dvidetl/read/verify.py"}
    return sorted(f for f, names in imported.items()
                  if "dvidetl.export.driver.execute" in names and f not in allowed)


def test_an_export_is_assembled_only_by_the_library_api():
    """``dvidetl.export`` / ``ExportRun`` is the one place a run is assembled (sink check,
    run record, execute, finish): the commands, the benchmarks and the tests call it."""
    files = [*PKG.rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "tests").rglob("*.py")]
    assert _assemblers(_imported_names(files)) == []
    # the check is not vacuous: a bench module doing it by hand is found
    assert _assemblers({"bench/bench_x.py": {"dvidetl.export.driver.execute"},
                        "dvidetl/export/api.py": {"dvidetl.export.driver.execute"}}) == ["bench/bench_x.py"]


CORE_PARAMETERS = {"client", "dask_client", "sink", "ep", "run", "part"}


def _untyped_core_parameters(path: Path) -> list[str]:
    """``function(name)`` of every public function of ``path`` with a core parameter that has
    no annotation (pytest's ``test_*`` methods take fixtures: left out)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith(("_", "test_")):
            a = node.args
            out += [f"{node.name}({x.arg})" for x in a.posonlyargs + a.args + a.kwonlyargs
                    if x.arg in CORE_PARAMETERS and x.annotation is None]
    return out


def test_core_parameters_are_typed_on_public_functions(tmp_path):
    """``client`` (Dask's or the Flight client), ``sink``, ``ep``, ``run`` and ``part`` say
    what they are wherever a public function takes them (mypy then checks the calls)."""
    bad = {str(p.relative_to(ROOT)): u for p in PKG.rglob("*.py") if (u := _untyped_core_parameters(p))}
    assert bad == {}
    probe = tmp_path / "probe.py"
    probe.write_text("def f(sink, run: int, *, part): ...\ndef _g(sink): ...\ndef test_h(sink): ...\n")
    assert _untyped_core_parameters(probe) == ["f(sink)", "f(part)"]


def _key_end_literals(tree: ast.AST) -> int:
    """``1 << 64`` and ``2**64`` (alone or minus one) written out in a module."""
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.left, ast.Constant) \
                and type(node.left.value) is int \
                and isinstance(node.right, ast.Constant) and node.right.value == 64 \
                and ((isinstance(node.op, ast.LShift) and node.left.value == 1)
                     or (isinstance(node.op, ast.Pow) and node.left.value == 2)):
            n += 1
    return n


def test_the_end_of_the_key_space_is_one_constant():
    """``geometry.KEY_END`` is the one "to the end" bound of Morton codes, labels and
    supervoxels (three spellings before issue 26): no other module writes 2**64 out."""
    found = {str(p.relative_to(ROOT)): _key_end_literals(ast.parse(p.read_text()))
             for p in PKG.rglob("*.py")}
    assert {p: n for p, n in found.items() if n and p != "dvidetl/geometry.py"} == {}
    assert found["dvidetl/geometry.py"] == 1
    assert _key_end_literals(ast.parse("a = 1 << 64\nb = 2**64 - 1\nc = 1 << 63\nd = 2.0**64")) == 2
