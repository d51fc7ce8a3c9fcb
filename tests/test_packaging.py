"""What `pip install keywatch` (not editable) ships: every data file the code reads, and
code that needs nothing from the checkout.

A wheel built before this check lacked the Redis store's Lua script (a directory without
`__init__.py`, matched by no package-data pattern): installed that way, every Redis call
failed. And `keywatch bench` imported `benchmarks` and a test helper, neither installed.
"""

from __future__ import annotations

import ast
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _installed_packages() -> list[Path]:
    """Package directories the `packages.find` include patterns select."""
    include = CONFIG["packages"]["find"]["include"]
    return sorted(p.parent for p in ROOT.rglob("__init__.py")
                  if ".venv" not in p.parts
                  and any(fnmatch(".".join(p.parent.relative_to(ROOT).parts), pattern)
                          for pattern in include))


def _package_of(path: Path, packages: list[Path]) -> Path | None:
    """The innermost installed package holding `path` (setuptools' data-file owner)."""
    holders = [pkg for pkg in packages if pkg in path.parents]
    return max(holders, key=lambda pkg: len(pkg.parts)) if holders else None


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [ROOT / line for line in out.splitlines()]


def test_every_data_file_of_an_installed_package_is_shipped() -> None:
    packages = _installed_packages()
    patterns = CONFIG["package-data"]["*"]
    assert ROOT / "benchmarks" in packages  # `keywatch bench` imports it
    missing = []
    for path in _tracked_files():
        pkg = _package_of(path, packages)
        if pkg is None or path.suffix == ".py" or not path.exists():
            continue
        relative = path.relative_to(pkg).as_posix()
        if not any(fnmatch(relative, pattern) for pattern in patterns):
            missing.append(str(path.relative_to(ROOT)))
    assert missing == [], f"tracked files no package-data pattern ships: {missing}"


NOT_INSTALLED = ("tests", "notebooks", "scripts")


def _module_names(tree: ast.AST) -> list[str]:
    """Modules a file imports, and module paths it names in strings (a server it starts
    as `package.module:app`, a module it runs with `-m`)."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.split(":", 1)[0]
            if "." in text and all(part.isidentifier() for part in text.split(".")):
                names.append(text)
    return names


def test_installed_code_imports_nothing_from_the_checkout() -> None:
    """No installed module imports, or starts a server from, `tests` (or anything else
    not installed)."""
    wrong = []
    for pkg in _installed_packages():
        for path in pkg.glob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            wrong += [f"{path.relative_to(ROOT)}: {n}" for n in _module_names(tree)
                      if n.split(".")[0] in NOT_INSTALLED]
    assert wrong == []
