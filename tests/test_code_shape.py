"""The package's shape, read from its source: short functions, a flat training driver, and the model's head names
and combined prediction stated only in pmg_jax/model.py."""

from __future__ import annotations

import ast
import pathlib

import pytest

import pmg_jax
from pmg_jax import loop, model

PACKAGE = pathlib.Path(pmg_jax.__file__).parent
COMPOUND = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.AsyncWith, ast.Try, ast.Match)
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def modules() -> dict[str, ast.Module]:
    """Every module of the package, parsed, by its path relative to the package."""
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def function_lengths(tree: ast.AST) -> dict[str, int]:
    """Lines of every function and method (nested ones too), by name."""
    return {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, FUNCTIONS)}


def depth(node: ast.AST) -> int:
    """The deepest nesting of compound statements (for, while, if, with, try, match) under `node`."""
    below = [depth(child) for child in ast.iter_child_nodes(node) if not isinstance(child, FUNCTIONS)]
    return int(isinstance(node, COMPOUND)) + max(below, default=0)


def driver(name: str) -> ast.FunctionDef:
    """The top-level function `name` of pmg_jax/loop.py."""
    tree = ast.parse(pathlib.Path(loop.__file__).read_text())
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def restatements(tree: ast.AST) -> list[str]:
    """Where a module states the model's head names as a literal, or sums logits itself (model.combined_logits's
    job): each as 'line: what'."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in model.HEADS]
            if len(names) >= 2:
                found.append(f"{node.lineno}: head names {names}")
        if isinstance(node, ast.Call) and _called(node) == "sum" and node.args and _several_logits(node.args[0]):
            found.append(f"{node.lineno}: a sum of logits")
        added = isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)
        if added and _mentions_logits(node.left) and _mentions_logits(node.right):
            found.append(f"{node.lineno}: logits added")
    return found


def _called(call: ast.Call) -> str:
    """The called function's last name: 'sum' for sum(...), jnp.sum(...) and np.sum(...)."""
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _several_logits(node: ast.AST) -> bool:
    """Whether an expression is the heads' logits together: a logits variable itself, its stack, a list of them,
    or a comprehension over them (where jnp.sum(jnp.square(logits), -1) sums one head's classes)."""
    if isinstance(node, (ast.Name, ast.Attribute)):
        return _mentions_logits(node)
    if isinstance(node, ast.Call) and _called(node) in ("stack", "array", "asarray", "concatenate") and node.args:
        return _several_logits(node.args[0])
    if isinstance(node, (ast.ListComp, ast.GeneratorExp)):
        return any(_mentions_logits(g.iter) for g in node.generators)
    if isinstance(node, (ast.List, ast.Tuple)):
        return len(node.elts) >= 2 and all(_mentions_logits(e) for e in node.elts)
    return False


def _mentions_logits(node: ast.AST) -> bool:
    """Whether an expression reads a variable or attribute whose name says logits."""
    return any(
        (isinstance(n, ast.Name) and "logit" in n.id) or (isinstance(n, ast.Attribute) and "logit" in n.attr)
        for n in ast.walk(node)
    )


def test_no_function_over_100_lines():
    long = {
        f"{path}:{name}": lines
        for path, tree in modules().items()
        for name, lines in function_lengths(tree).items()
        if lines > 100
    }
    assert not long, f"functions over 100 lines: {long}"


@pytest.mark.parametrize("name", ["train_and_evaluate", "_train"])
def test_the_training_driver_is_short_and_flat(name):
    fn = driver(name)
    assert fn.end_lineno - fn.lineno + 1 <= 80
    assert max(depth(stmt) for stmt in fn.body) <= 3


def test_head_names_and_the_combined_prediction_are_stated_only_in_the_model_module():
    found = {path: hits for path, tree in modules().items() if path != "model.py" and (hits := restatements(tree))}
    assert not found, f"re-stated outside pmg_jax/model.py: {found}"


def test_the_checks_see_what_they_forbid():
    """Each check flags a sample of what it forbids (so an empty result above means the package is clean)."""
    sample = ast.parse(
        "HEADS = ('head1', 'head2', 'head3', 'concat')\n"
        "combined = sum(logits)\n"
        "fine = jnp.sum(jnp.square(logits), axis=-1)\n"
        "also = sum(z for z in net.logits)\n"
        "also = jnp.sum(jnp.stack(out.logits), 0)\n"
        "pair = logits[0] + logits[1]\n"
        "def deep():\n    for a in b:\n        while c:\n"
        "            if d:\n                with e:\n                    pass\n"
    )
    assert sorted(int(hit.split(":")[0]) for hit in restatements(sample)) == [1, 2, 4, 5, 6]
    assert depth(sample.body[-1]) == 4
    assert function_lengths(sample) == {"deep": 6}
