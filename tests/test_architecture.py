"""The layering a notebook user relies on: inference modules load without the training loop, its steps or the
optimizer (import-linter checks the imports as written; this checks what importing actually loads)."""

import ast
import os
import pkgutil
import re
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT, one_fast

import pmg_jax

TRAINING = ("pmg_jax.loop", "pmg_jax.steps", "pmg_jax.optim")


@pytest.mark.parametrize(
    "module",  # each a fresh process importing jax: explain_history (cam, viz, checkpoint) in the fast tier
    one_fast(
        [
            "pmg_jax.state",
            "pmg_jax.explain",
            "pmg_jax.predict",
            "pmg_jax.export",
            "pmg_jax.cli.explain",
            "pmg_jax.explain_history",
        ],
        "pmg_jax.explain_history",
    ),
)
def test_importing_an_inference_module_loads_no_training_code(module):
    code = f"import sys, {module}; print(' '.join(m for m in {TRAINING!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [], f"importing {module} loaded {done.stdout.strip()}"


def _doc() -> str:
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        return f.read()


def _layers_in_pyproject() -> list[list[str]]:
    """The layers contract's layers, top first, each as its module names without 'pmg_jax.'."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    return [[m.strip().removeprefix("pmg_jax.") for m in re.split(r"[|:]", layer)] for layer in layers]


def test_the_docs_layer_diagram_is_the_import_contracts():
    diagram = re.search(r"```\n(cli .*?)```", _doc(), flags=re.S).group(1)
    rows = [re.split(r"\s{2,}", line.strip())[0] for line in diagram.splitlines() if not line.startswith(" ")]
    assert [[m.strip() for m in re.split(r"[|:]", row)] for row in rows] == _layers_in_pyproject()


def test_the_doc_names_every_module_and_no_other():
    """Each module of the package is named in 'The modules' as `path.py` (relative to pmg_jax/), and every
    such name is a module; the layers name every top-level module and package."""
    text = _doc().split("## The modules", 1)[1]
    named = {n for n in re.findall(r"`([\w/]+\.py)`", text) if not n.startswith("tests/")}
    modules = {
        m.name.removeprefix("pmg_jax.").replace(".", "/") + ".py"
        for m in pkgutil.walk_packages(pmg_jax.__path__, "pmg_jax.")
        if not m.ispkg
    }
    assert sorted(named - modules) == [] and sorted(modules - named) == []
    top = {m.name.split(".")[1] for m in pkgutil.walk_packages(pmg_jax.__path__, "pmg_jax.")}
    assert sorted(m for layer in _layers_in_pyproject() for m in layer) == sorted(top)


def test_the_heads_and_the_combined_prediction_are_named_once():
    """Only model.py spells out a head's name, sums the heads' logits or ranks classes: the others take
    model.HEADS, model.COMBINED, model.combined_logits, model.top_k and model.accuracy_table."""
    found = []
    for info in pkgutil.walk_packages(pmg_jax.__path__, "pmg_jax."):
        if info.name == "pmg_jax.model":
            continue
        path = os.path.join(ROOT, *info.name.split(".")) + ("/__init__.py" if info.ispkg else ".py")
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in ("head1", "head2", "head3"):
                found.append(f"{info.name}:{node.lineno}: the literal {node.value!r}")
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "sum" and "logits" in ast.unparse(node):
                found.append(f"{info.name}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.FunctionDef) and node.name in ("top_k", "format_accuracy_table"):
                found.append(f"{info.name}:{node.lineno}: def {node.name}")
    assert found == []
