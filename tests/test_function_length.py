"""Functions short enough to read at once.

No function of the product (features, models, training, serving, the gateway) is longer
than `MAX_LINES`. The few that still are, listed in `KNOWN_LONG` with their length today,
may only shrink: a new long function, or a listed one growing, fails this test, and a
listed one brought under the bar must leave the list (so the list only ever shortens).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "models", "training", "serving", "keywatch_gateway")
MAX_LINES = 60
KNOWN_LONG: dict[str, int] = {
    "features/extractor.py:FeatureExtractor.build": 107,
    "serving/policy/fusion.py:fuse": 82,
    "training/evaluate.py:write_plots": 77,
    "training/retrain.py:retrain": 73,
    "training/incidents.py:credential_stuffing": 70,
    "features/extractor.py:FeatureExtractor._plan_key": 67,
    "training/incidents.py:llm_jacking": 63,
}


def function_lengths() -> dict[str, int]:
    """Every function and method of the product, by `path:Qualified.name`, with its length
    in lines (decorators and docstring excluded)."""
    lengths: dict[str, int] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            _collect(tree, f"{path.relative_to(ROOT).as_posix()}:", lengths)
    return lengths


def _length(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the signature to the end, less the docstring: a long explanation of the
    parameters is reading help, not code to hold in one's head."""
    lines = (fn.end_lineno or fn.lineno) - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        lines -= (first.end_lineno or first.lineno) - first.lineno + 1
    return lines


def _collect(node: ast.AST, prefix: str, out: dict[str, int]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            name = prefix + child.name
            out[name] = max(out.get(name, 0), _length(child))
            _collect(child, name + ".", out)
        elif isinstance(child, ast.ClassDef):
            _collect(child, prefix + child.name + ".", out)
        else:
            _collect(child, prefix, out)


def test_no_function_is_longer_than_the_bar_unless_listed_and_shrinking() -> None:
    lengths = function_lengths()
    assert len(lengths) > 500  # the walk found the product
    too_long = {n: n_lines for n, n_lines in lengths.items()
                if n_lines > MAX_LINES and n_lines > KNOWN_LONG.get(n, 0)}
    assert not too_long, f"functions over {MAX_LINES} lines (or grown): {too_long}"
    shortened = {n: lengths.get(n) for n in KNOWN_LONG
                 if lengths.get(n, 0) <= MAX_LINES}
    assert not shortened, f"now short enough (or gone): drop them from KNOWN_LONG: {shortened}"
