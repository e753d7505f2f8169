"""The fast tier (`python -m pytest -m "not slow"`) still reaches every module of the package: each is imported
or run (python -m, train.py, explain.py) by a test with a case not marked slow, or at the top of a file that has
one. Which cases are slow is pytest's own answer (a parametrized test may have fast and slow cases)."""

import ast
import os
import pkgutil
import subprocess
import sys

import pytest
from conftest import ROOT

import pmg_jax

SCRIPTS = {"train.py": "pmg_jax.cli.train", "explain.py": "pmg_jax.cli.explain"}  # the repository's entry points


def package_modules() -> set[str]:
    """Every module of pmg_jax (packages' __init__ left out: importing any of their modules runs them)."""
    return {m.name for m in pkgutil.walk_packages(pmg_jax.__path__, "pmg_jax.") if not m.ispkg}


def _reached(tree: ast.AST) -> set[str]:
    """The names of package modules and packages a piece of code imports or runs."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pmg_jax"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= {node.value} | {m for s, m in SCRIPTS.items() if node.value.endswith(s)}
    return {m for m in found if m.startswith("pmg_jax")}


def fast_tests(session: pytest.Session) -> set[tuple[str, str]]:
    """(file name, function name) of every test function with at least one case the fast tier runs: pytest's own
    marks, parametrized cases' included. This session's items when it collected the whole suite unfiltered, else a
    collection of the fast tier in a fresh process."""
    config = session.config
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword:
        ids = [item.nodeid for item in session.items if item.get_closest_marker("slow") is None]
    else:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow", "-p", "no:xdist", "tests"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-2000:]
        ids = [line for line in done.stdout.splitlines() if "::" in line]
    return {(os.path.basename(i.split("::")[0]), i.split("::")[1].split("[")[0].split("@")[0]) for i in ids}


def fast_tier_reach(fast: set[tuple[str, str]]) -> dict[str, set[str]]:
    """By test file: the package names reached by its fast tests (their bodies, and the file's top level when any of
    its tests is fast)."""
    reach = {}
    for name in sorted({file for file, _ in fast}):
        with open(os.path.join(ROOT, "tests", name)) as f:
            tree = ast.parse(f.read())
        tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and (name, n.name) in fast]
        top = ast.Module([n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)], [])
        reach[name] = _reached(top).union(*(_reached(t) for t in tests))
    return reach


def through_packages(reached: set[str], modules: set[str]) -> set[str]:
    """`reached` and the modules that the __init__ of each reached package imports (importing it runs them)."""
    out = set(reached)
    for package in reached - modules:
        path = os.path.join(ROOT, *package.split("."), "__init__.py")
        if os.path.isfile(path):
            with open(path) as f:
                out |= _reached(ast.parse(f.read()))
    return out & modules


def test_every_module_is_reached_by_a_fast_test(request):
    modules = package_modules()
    assert {"pmg_jax.loop", "pmg_jax.cli.train", "pmg_jax.data.pipeline"} <= modules  # the walk sees subpackages
    reached = through_packages(set().union(*fast_tier_reach(fast_tests(request.session)).values()), modules)
    assert sorted(modules - reached) == []
