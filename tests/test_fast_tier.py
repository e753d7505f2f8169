"""The fast tier (`python -m pytest -m "not slow"`) still reaches every module of the package: each is imported
or run (python -m, train.py, explain.py) by a test not marked slow, or at the top of a file that has one."""

import ast
import os
import pkgutil

from conftest import ROOT

import pmg_jax

SCRIPTS = {"train.py": "pmg_jax.cli.train", "explain.py": "pmg_jax.cli.explain"}  # the repository's entry points


def package_modules() -> set[str]:
    """Every module of pmg_jax (packages' __init__ left out: importing any of their modules runs them)."""
    return {m.name for m in pkgutil.walk_packages(pmg_jax.__path__, "pmg_jax.") if not m.ispkg}


def _slow(node: ast.AST) -> bool:
    """Whether a function or a module-level `pytestmark` carries pytest.mark.slow."""
    return "mark.slow" in ast.unparse(node)


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


def fast_tier_reach() -> dict[str, set[str]]:
    """By test file: the package names reached by its fast tests (their bodies, and the file's top level when any of
    its tests is fast)."""
    reach = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        with open(os.path.join(ROOT, "tests", name)) as f:
            tree = ast.parse(f.read())
        if any(isinstance(n, ast.Assign) and "pytestmark" in ast.unparse(n) and _slow(n) for n in tree.body):
            continue
        tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        fast = [t for t in tests if not any(_slow(d) for d in t.decorator_list)]
        if fast:
            top = ast.Module([n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)], [])
            reach[name] = _reached(top).union(*(_reached(t) for t in fast))
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


def test_every_module_is_reached_by_a_fast_test():
    modules = package_modules()
    assert {"pmg_jax.loop", "pmg_jax.cli.train", "pmg_jax.data.pipeline"} <= modules  # the walk sees subpackages
    reached = through_packages(set().union(*fast_tier_reach().values()), modules)
    assert sorted(modules - reached) == []
