"""timm for the parity tests, importable beside a CPU-only torch that has no working torchvision.

timm imports torchvision when it is imported, for its data pipeline (datasets, transforms)
and a FrozenBatchNorm2d type, none of which the model definitions compared here touch.
PyPI's torchvision builds link against a CUDA torch: beside the CPU torch the tests pin,
`import torchvision` fails ("operator torchvision::nms does not exist"). Where it fails,
the few torchvision modules that timm names are stood in for by empty placeholders
before timm is imported; a working torchvision is used as it is.
"""

from __future__ import annotations

import sys
import types

# The torchvision modules timm imports from at import time; every name taken from them is a placeholder.
_NAMED_BY_TIMM = ("ops", "ops.misc", "transforms", "transforms.functional", "datasets")


class _Placeholder(type):
    """A class whose every attribute is another placeholder class (e.g. `InterpolationMode.BILINEAR`)."""

    def __getattr__(cls, name: str) -> type:
        return _placeholder_attribute(name)


def _placeholder_attribute(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Placeholder(name, (), {})


def _placeholder_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "placeholder: torchvision does not import here")
    module.__path__ = []  # a package, so that unknown submodules (feature_extraction) raise ImportError
    module.__getattr__ = _placeholder_attribute
    return module


def _stand_in_for_torchvision() -> None:
    for name in [n for n in sys.modules if n.partition(".")[0] in ("torchvision", "timm")]:
        del sys.modules[name]  # what a failed import left half-made
    root = types.ModuleType("torchvision", "placeholder: torchvision does not import here")
    root.__path__ = []
    sys.modules["torchvision"] = root
    for sub in _NAMED_BY_TIMM:
        module = _placeholder_module(f"torchvision.{sub}")
        sys.modules[module.__name__] = module
        parent, _, leaf = module.__name__.rpartition(".")
        setattr(sys.modules[parent], leaf, module)


def import_timm() -> types.ModuleType:
    """The timm package, with torchvision stood in for where it does not import."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        _stand_in_for_torchvision()
    import timm

    return timm
