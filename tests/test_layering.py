"""The import direction is a rule, checked by parsing imports rather than by convention."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE = {"losses", "metrics", "stats", "calibration", "geometry", "geometry_optimum"}


def _is_main_guard(test: ast.expr) -> bool:
    return (isinstance(test, ast.Compare) and getattr(test.left, "id", None) == "__name__"
            and any(getattr(c, "value", None) == "__main__" for c in test.comparators))


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (imports for type checkers, never run) and under
    `if __name__ == "__main__":` (`python -m pipeline.<stage>` handing over to pipeline.cli: the
    script, not the module other modules import)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (getattr(node.test, "id", None) == "TYPE_CHECKING"
                                         or getattr(node.test, "attr", None) == "TYPE_CHECKING"
                                         or _is_main_guard(node.test)):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def _imports(path: Path) -> set[str]:
    """Every module a file imports when imported, at the top or inside functions (see _type_checking_blocks)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_blocks(tree)
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative import: resolve against the file's package
                pkg = path.relative_to(ROOT).with_suffix("").parts[: -node.level]
                mod = ".".join(pkg + ((mod,) if mod else ()))
                names.update(f"{mod}.{a.name}" for a in node.names)
            names.add(mod)
    return names


def test_data_prep_never_imports_pipeline():
    offenders = {
        str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n == "pipeline" or n.startswith("pipeline."))
        for p in (ROOT / "data_prep").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_pure_modules_import_neither_config_nor_mlflow():
    bad = {}
    for name in PURE:
        path = ROOT / "pipeline" / f"{name}.py"
        if not path.exists():
            continue
        found = sorted(n for n in _imports(path) if n.startswith("mlflow") or n.startswith("pipeline.config"))
        if found:
            bad[name] = found
    assert bad == {}


def test_only_tracking_imports_mlflow():
    users = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "pipeline").rglob("*.py")
        if any(n == "mlflow" or n.startswith("mlflow.") for n in _imports(p))
    )
    assert users == ["pipeline/tracking.py"]


def test_pipeline_uses_data_prep_public_surface_only():
    offenders = []
    for p in (ROOT / "pipeline").rglob("*.py"):
        for n in _imports(p):
            if n.startswith("data_prep.") and n.split(".")[1] not in _public_names():
                offenders.append(f"{p.relative_to(ROOT)}: {n}")
    assert offenders == []


def _public_names() -> set[str]:
    import data_prep

    return set(data_prep.__all__)


def test_no_public_function_shares_its_module_name():
    """A function exported as `pkg.name` from a module `pkg/name.py` is shadowed by the module once
    anything imports that submodule (import order then decides what `pkg.name` is)."""
    import importlib

    clashes = []
    for pkg in ("data_prep", "pipeline"):
        mod = importlib.import_module(pkg)
        for name in getattr(mod, "__all__", []):
            if (ROOT / pkg / f"{name}.py").exists():
                clashes.append(f"{pkg}.{name}")
    assert clashes == []


#: the stages: each is one `ecl` command; `cli` and `demo` are the orchestrators that chain them
STAGES = {"train", "evaluate", "predict", "compare", "geometry_stage"}


def _pipeline_graph() -> dict[str, set[str]]:
    """module -> the pipeline modules it imports, anywhere in the file (deferred imports in functions too)."""
    modules = {p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps = set()
        for imported in _imports(ROOT / "pipeline" / f"{name}.py"):
            parts = imported.split(".")
            if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in modules and parts[1] != name:
                deps.add(parts[1])
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    import graphlib

    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


def test_cycle_finder_finds_a_deferred_cycle():
    """The check below can fail: a two-module and a three-module cycle are found, a chain is not."""
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert sorted(set(_cycle({"a": {"b"}, "b": {"a"}}))) == ["a", "b"]
    assert sorted(set(_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}))) == ["a", "b", "c"]


def test_imports_inside_functions_are_seen(tmp_path):
    path = ROOT / "pipeline" / "geometry_stage.py"  # imports pipeline.inference only inside a function
    assert "pipeline.inference" in _imports(path)
    assert "inference" in _pipeline_graph()["geometry_stage"]


def test_pipeline_modules_import_no_cycle():
    assert _cycle(_pipeline_graph()) is None


def test_no_stage_imports_another_stage():
    """A stage never runs (or borrows from) another stage; shared work lives in a non-stage module
    (`inference`, `eval_sections`, `geometry_report`, ...). `cli` and `demo` chain the stages."""
    graph = _pipeline_graph()
    assert STAGES <= set(graph)
    offenders = {stage: sorted(graph[stage] & STAGES) for stage in sorted(STAGES) if graph[stage] & STAGES}
    assert offenders == {}
