"""The package's layout: the core never imports the tooling, no shipped file names a path of
this workspace, every imported package is declared, the tooling's files stay small."""
import ast
import re
import sys
from pathlib import Path

import pytest

from helpers_tiny import modules_after_import

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "glsd"
TOOLS = PKG / "tools"
# The core: data, models, loss, train, eval, config, export, utils. The CLI (cli.py and its
# subcommands, commands.py) is the one place that reaches the tooling (lazily, checked below).
CORE_FILES = sorted(p for p in PKG.rglob("*.py")
                    if TOOLS not in p.parents and p.name not in ("cli.py", "commands.py", "__main__.py"))
# Import name -> the distribution pyproject.toml declares it as.
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml"}


def _imports(path: Path) -> list[str]:
    """Absolute module names a file imports (``from glsd import tools`` -> glsd.tools)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_core_modules_never_import_the_tooling():
    assert len(CORE_FILES) > 20  # the scan sees the package
    bad = [f"{p.relative_to(PKG)}: {name}" for p in CORE_FILES for name in _imports(p)
           if name == "glsd.tools" or name.startswith("glsd.tools.")]
    assert not bad, bad


def test_the_cli_imports_the_tooling_only_inside_its_subcommands():
    for module in ("cli.py", "commands.py"):  # the command line and what its subcommands do
        tree = ast.parse((PKG / module).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [getattr(n, "module", None) or n.names[0].name for n in top]
        assert not [n for n in names if n and n.startswith("glsd.tools")], (module, names)
    assert "glsd.tools" in (PKG / "commands.py").read_text()  # ... and does import it, lazily


def test_importing_training_and_evaluation_loads_no_tooling():
    assert modules_after_import("glsd.train.pretrain, glsd.eval.runner, glsd.export, glsd.cli",
                                ("glsd.tools",)) == []


def test_layers_models_and_evaluation_do_not_import_training():
    # The model builder and an evaluation module stand on their own: no training loop, loader
    # or run folder comes with them (glsd.eval's names load on first use).
    loaded = modules_after_import("glsd.models.backbone, glsd.eval.knn, glsd.eval.eval_data",
                                  ("glsd.train", "glsd.data.loader", "glsd.eval.runner"))
    assert loaded == []


def test_glsd_eval_names_load_on_use():
    from glsd.eval import knn_classify, run_eval
    from glsd.eval.knn import knn_classify as direct
    assert knn_classify is direct and run_eval.__module__ == "glsd.eval.runner"
    import glsd.eval
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        glsd.eval.nothing


def test_the_scan_would_see_a_core_import_of_the_tooling(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from glsd.tools.bench import run_bench\nfrom glsd import tools\n")
    assert {"glsd.tools.bench", "glsd.tools"} <= set(_imports(bad))


def test_no_shipped_file_names_a_path_of_this_workspace():
    pattern = re.compile(r"shared/data|\.\./shared|/work/")
    hits = []
    for path in PKG.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".yaml", ".yml", ".md", ".txt", ".json"):
            hits += [f"{path.relative_to(PKG)}:{i}" for i, line in
                     enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def _declared() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    extras = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return {re.split(r"[<>=\[ ]", item.strip().strip('",'))[0].lower()
            for item in re.findall(r'"([^"]+)"', block + extras)}


def test_every_imported_package_is_declared():
    stdlib = set(sys.stdlib_module_names)
    imported = {name.split(".")[0] for p in PKG.rglob("*.py") for name in _imports(p)}
    third_party = {n for n in imported if n not in stdlib and n not in ("glsd", "__future__")}
    declared = _declared()
    missing = sorted(n for n in third_party if DISTRIBUTIONS.get(n, n).lower() not in declared)
    assert not missing, f"imported but not in pyproject.toml: {missing}"
    assert {"numpy", "pillow", "torch"} <= declared


@pytest.mark.parametrize("path", sorted(TOOLS.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_tooling_files_stay_under_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400
