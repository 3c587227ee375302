"""The layering of docs/architecture.md holds: import-linter contracts, scripts that never import the demo fixtures,
short functions, no sys.path tricks, a repository that cites only its own docs."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGES = ("core", "models", "metrics", "datamodules", "lightning_modules", "callbacks", "evaluation", "synthetic", "benchmarks")
SCRIPTS = ("train.py", "generate.py", "export.py", "evaluate.py", "reproduce.py")
# the phantom renderer's drawing code is the one long function allowed
LONG_ALLOWED = {("synthetic/phantoms.py", "_render_frontal")}
MAX_LINES = 80


def python_files() -> list[Path]:
    return sorted(p for d in PACKAGES for p in (REPO / d).rglob("*.py")) + [REPO / s for s in SCRIPTS]


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([lint, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 kept, 0 broken" in proc.stdout


def test_scripts_never_import_the_demo_fixtures():
    for script in SCRIPTS:
        tree = ast.parse((REPO / script).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not [m for m in imported if m == "synthetic" or m.startswith("synthetic.")], script


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in python_files():
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (rel, node.name) not in LONG_ALLOWED:
                if node.end_lineno - node.lineno + 1 > MAX_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_nothing_edits_sys_path_and_nothing_cites_files_outside_the_repository():
    texts = {p: p.read_text() for p in python_files() + sorted((REPO / "tests").glob("*.py"))}
    texts.update({p: p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "configs").glob("*.yaml"))]})
    this = Path(__file__)
    assert not [p for p, t in texts.items() if "sys.path.insert" in t and p != this]
    assert not [p for p, t in texts.items() if ("REFERENCE §" in t or "../shared" in t) and p != this]


def test_the_docs_layout_names_every_top_level_folder_and_script():
    layout = (REPO / "docs" / "layout.md").read_text()  # the README's former "## Layout" section, linked from it
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    tops = {p.split("/")[0] for p in tracked if "/" in p and not p.startswith(".")} | {p for p in tracked if p.endswith(".py") and "/" not in p}
    missing = sorted(t for t in tops if (t + "/" if (REPO / t).is_dir() else t) not in layout)
    assert not missing, missing
