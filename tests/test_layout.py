"""The tree's rooms and the direction of their imports, read from the source with ``ast``.

``jobs → pipeline → std_core``; the demo (``pipeline/demo/``) and the benchmarks (``pipeline/bench/``)
use the pipeline, and the production pipeline reaches into the demo only for the embedded default (its
sample clips and its model's location), inside the functions that need them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)
# where a production module may import the demo (function-level imports only)
DEMO_ENTRANCES = {
    ("pipeline/models.py", "default_model_dir"),
    ("pipeline/models.py", "_demo_label"),  # the committed weights' hash, for the model column
    ("pipeline/run.py", "_sample_input"),
    ("pipeline/evaluation.py", "caption_scorer_for"),  # the demo's caption attributes, on its own clips only
}


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(imported module, enclosing function or None for module level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, function))
            visit(child, function)

    visit(tree, None)
    return found


def _files(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


def test_the_rooms_exist_and_hold_code() -> None:
    for room in ("std_core", "pipeline", "pipeline/demo", "pipeline/bench", "jobs"):
        assert len(_files(room)) >= 3, room


def test_std_core_imports_torch_and_transformers_only() -> None:
    allowed = STDLIB | {"torch", "transformers", "std_core", "__future__"}
    for path in _files("std_core"):
        for module, _ in _imports(path):
            assert module.split(".")[0] in allowed, f"{path.relative_to(ROOT)} imports {module}"


def test_nothing_below_jobs_imports_a_job() -> None:
    for path in [*_files("pipeline"), *_files("std_core")]:
        for module, _ in _imports(path):
            assert module.split(".")[0] != "jobs", f"{path.relative_to(ROOT)} imports {module}"


def test_the_production_pipeline_knows_nothing_of_the_demo_or_the_benchmarks() -> None:
    production = [p for p in _files("pipeline") if p.parent == ROOT / "pipeline"]
    assert {p.name for p in production} >= {"sources.py", "frames.py", "annotator.py", "sink.py", "run.py"}
    for path in production:
        rel = str(path.relative_to(ROOT))
        for module, function in _imports(path):
            if module == "pipeline.bench" or module.startswith("pipeline.bench."):
                raise AssertionError(f"{rel} imports {module}")
            if module.startswith("pipeline.demo"):
                assert (rel, function) in DEMO_ENTRANCES, f"{rel} imports {module} in {function or 'module'}"
