"""The import-linter contracts in pyproject.toml catch an import that goes the wrong way, and each
contract is what catches it: without the contract the same import passes.

Each test lints a copy of the package with one bad import added, so the checks hold whatever else
the tree holds (they look for that import in the report, not only at the exit code)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is a test extra")

# One import of a reported chain: "- a -> b (l.3)", continued as "  b -> c (l.9)".
CHAIN_STEP = re.compile(r"^[-\s]\s*(\S+) -> (\S+) \(l\.")


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def package_copy(tmp_path: Path, module: str = "", line: str = "") -> Path:
    """A copy of tensorjet under tmp_path, with `line` appended to `module` (a dotted name)."""
    shutil.copytree(ROOT / "tensorjet", tmp_path / "tensorjet", ignore=shutil.ignore_patterns("__pycache__"))
    if module:
        path = tmp_path.joinpath(*module.split(".")).with_suffix(".py")
        path.write_text(path.read_text() + f"\n{line}\n")
    return tmp_path


def lint(root: Path, skip: str | None = None) -> tuple[int, set[tuple[str, str]]]:
    """Run lint-imports on the copy at `root` with the project's contracts (less the one whose id is
    `skip`); returns the exit code and every reported import (importer, imported)."""
    config = root / "contracts.toml"
    lines = ["[tool.importlinter]", f"root_package = {json.dumps('tensorjet')}"]
    for contract in contracts():
        if contract["id"] == skip:
            continue
        lines.append("[[tool.importlinter.contracts]]")
        # Strings and lists of strings in JSON are valid TOML.
        lines += [f"{key} = {json.dumps(value)}" for key, value in contract.items()]
    config.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "500", "NO_COLOR": "1"}
    result = subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo", str(config)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Contracts:" in result.stdout, result.stdout + result.stderr  # it ran, it did not stop on an error
    found = {m.groups() for m in map(CHAIN_STEP.match, result.stdout.splitlines()) if m}
    return result.returncode, found


def test_an_upward_import_is_caught_by_the_layers_contract_only(tmp_path):
    bad = ("tensorjet.kernels.norm", "tensorjet.llm")
    assert bad not in lint(package_copy(tmp_path / "clean"))[1]
    root = package_copy(tmp_path / "bad", "tensorjet.kernels.norm", "import tensorjet.llm")
    code, found = lint(root)
    assert code != 0 and bad in found
    assert bad not in lint(root, skip="layers")[1]


def test_a_leaf_importing_even_the_lowest_layer_is_caught_by_the_leaves_contract_only(tmp_path):
    """config importing kernels breaks no layer (everything above may import kernels), but kernels
    could then never import config: the leaves contract keeps the leaves free of layers."""
    bad = ("tensorjet.config", "tensorjet.kernels.norm")
    assert bad not in lint(package_copy(tmp_path / "clean"))[1]
    root = package_copy(tmp_path / "bad", "tensorjet.config", "import tensorjet.kernels.norm")
    code, found = lint(root)
    assert code != 0 and bad in found
    assert bad not in lint(root, skip="leaves")[1]


def test_the_command_line_modules_form_no_cycle(tmp_path):
    """`engine_args` sits below the commands that share it: importing one of them back is caught."""
    root = package_copy(tmp_path, "tensorjet.engine_args", "import tensorjet.cli")
    code, found = lint(root)
    assert code != 0 and ("tensorjet.engine_args", "tensorjet.cli") in found
