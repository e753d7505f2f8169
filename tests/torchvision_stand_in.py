"""timm and pytorch-grad-cam for the parity tests, importable beside a CPU-only torch with no working torchvision.

Both import torchvision when they are imported, for parts the tests never use (timm: data transforms,
datasets, FrozenBatchNorm2d; pytorch_grad_cam: image helpers and box targets). PyPI's torchvision wheels
link against a CUDA torch, so beside the CPU torch the test extra pins `import torchvision` fails (or
torchvision is absent). Where it does not import, placeholder torchvision modules stand in for it while
the package is imported, and are removed again afterwards; a working torchvision is used as it is.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types

# The torchvision submodules timm and pytorch_grad_cam import from at import time.
_SUBMODULES = ("ops", "ops.misc", "transforms", "transforms.functional", "datasets")


class _Placeholder(type):
    """A stand-in class: its attributes are placeholders too (`InterpolationMode.BILINEAR`), calling it raises."""

    def __getattr__(cls, name: str) -> type:
        return _placeholder(name)

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision does not import here: {cls.__name__} is a placeholder")


def _placeholder(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Placeholder(name, (), {})


def _placeholder_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "placeholder: torchvision does not import here")
    module.__path__ = []  # a package: a submodule not stood in for (feature_extraction) raises ImportError
    module.__getattr__ = _placeholder
    return module


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@functools.cache
def import_beside_cpu_torch(package: str) -> types.ModuleType:
    """`package` (e.g. 'timm', 'pytorch_grad_cam'), imported with torchvision stood in for where it does not import."""
    if _torchvision_imports():
        return importlib.import_module(package)
    for name in [n for n in sys.modules if n.partition(".")[0] in ("torchvision", package)]:
        del sys.modules[name]  # what a failed import left half-made
    stand_ins = {"torchvision": _placeholder_module("torchvision")}
    for sub in _SUBMODULES:
        stand_ins[f"torchvision.{sub}"] = module = _placeholder_module(f"torchvision.{sub}")
        parent, _, leaf = module.__name__.rpartition(".")
        setattr(stand_ins[parent], leaf, module)
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module(package)
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
