"""The layout's rules, checked on the source (docs/internals.md, "Who may import whom"): the library (``ldm/``,
``autoencoder/``) never imports the lab or a script, ``ldm/`` never imports the stage-1 package, every public command
is one file in ``scripts/`` with its own parser and ``main``, and no comment or config cites a document that is not
in the repository."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from lab.stages import script

LIBRARY = ("ldm", "autoencoder")
COMMANDS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` (a file of ``package``) imports, at any depth (function-level imports included),
    relative imports resolved."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


def imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(), ".".join(path.relative_to(ROOT).parts[:-1]))


def library_files() -> list[Path]:
    return sorted(p for top in LIBRARY for p in (ROOT / top).rglob("*.py"))


def top_level(name: str) -> str:
    return name.split(".")[0]


def test_imported_modules_sees_nested_and_relative_imports():
    """The checker itself: an import inside a function and relative imports are all seen."""
    source = "def f():\n    import lab.compare\nfrom . import util\nfrom ..cache import manifest\n"
    assert imported_modules(source, "ldm.data") == {"lab.compare", "ldm.data", "ldm.cache"}


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_the_lab_or_a_script(path):
    bad = {m for m in imports_of(path) if top_level(m) in ("lab", "scripts")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: the library must not depend on the lab"


@pytest.mark.parametrize("path", sorted((ROOT / "ldm").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_ldm_never_imports_the_stage1_package(path):
    bad = {m for m in imports_of(path) if top_level(m) == "autoencoder"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: stage 2 gets its first stage through a config"


def test_the_library_holds_no_lab_code():
    """No study, comparison, benchmark target or pipeline runner under the library."""
    lab_names = re.compile(r"\b(TARGETS|GPU_TARGETS|check_targets|run_comparison|run_ablation|run_study|Pipeline)\b")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in library_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if lab_names.search(line)]
    assert not hits, hits
    assert not (ROOT / "ldm" / "tools").exists()


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_is_one_file_with_its_parser_and_main(name):
    module = script(name)
    assert callable(module.main)
    parser = module.build_parser()
    assert parser.format_help()  # its own options, documented
    assert "__main__" in (ROOT / "scripts" / f"{name}.py").read_text()


def test_no_reference_to_documents_outside_the_repository():
    """Comments, docstrings and configs cite the paper or files under docs/, never a handbook or a work item."""
    pattern = r"spec §|DESIGN\.md|issue [0-9]+|issue-[0-9]+"
    out = subprocess.run(["git", "grep", "-nE", pattern, "--", "ldm", "autoencoder", "scripts", "configs", "lab",
                          "main.py"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr  # 1: nothing found
    assert out.stdout == "", out.stdout
