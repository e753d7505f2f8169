"""Export a trained run as one function of uint8 images, as StableHLO (jax.export) or ONNX, with a model card.

The function takes RGB uint8 images, NHWC, already resized and centre-cropped to the crop size (the caller
resizes: DIR/model.json says how), with any batch size, and returns the softmax of the sum of the heads' logits
('probabilities': PMG's four heads, PMG-V2's three, as the run's config.method says) and each head's logits
('head1', 'head2', 'head3', and PMG's 'concat'). Normalisation happens inside. DIR/model.json holds the class
names, sizes, mean/std, input and outputs, the method and the source.
The command line is pmg_jax/cli/export.py (`python -m pmg_jax.export`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pmg_jax import kernels, methods
from pmg_jax.data import pipeline
from pmg_jax.errors import PMGError
from pmg_jax.state import Restored, transform_spec

FORMATS = {"stablehlo": "model.stablehlo", "onnx": "model.onnx"}
INPUT_NAME = "images"
# jax.export lowers for these; the exported model holds no platform-specific code, so it runs on any of them
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportError(PMGError, RuntimeError):
    """An export that cannot be done as asked (e.g. a missing converter); the message is one line."""


def output_names(restored: Restored) -> tuple[str, ...]:
    """The exported function's outputs: 'probabilities', then the run's method's heads (config.method)."""
    return ("probabilities", *methods.get(restored.config.method).heads)


def inference_function(restored: Restored) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """uint8 NHWC crops -> (softmax of the prediction's logits, then each head's: `output_names`), the weights as
    constants.

    Computes in float32 (the parameters' dtype) whatever the run trained in, so that every runtime can run it.
    """
    model, spec = restored.model.clone(dtype=jnp.float32), transform_spec(restored.config)
    method = methods.get(restored.config.method)
    variables = restored.variables

    def infer(images: jax.Array) -> tuple[jax.Array, ...]:
        logits = model.apply(variables, pipeline.normalize_on_device(images, spec), train=False)
        return (jax.nn.softmax(method.combined(logits), axis=-1), *logits)

    return infer


# Every convolution direct: the CPU Winograd path is chosen from the batch size, which a symbolic batch does not
# have, and an exported program is for any runtime. The max pool stays the strided-view one, which converters
# reproduce exactly (docs/predict.md: flax's and lax.reduce_window's did not convert correctly).
EXPORT_KERNELS = kernels.Kernels(winograd="off")


def _portable(fn: Callable) -> Callable:
    """`fn` traced with EXPORT_KERNELS, whatever is current when it is traced."""
    return kernels.traced(fn, EXPORT_KERNELS)


def _input_spec(restored: Restored) -> jax.ShapeDtypeStruct:
    s = restored.config.data.crop_size
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"batch, {s}, {s}, 3"), jnp.uint8)


def stablehlo(restored: Restored) -> jax.export.Exported:
    """The inference function exported by jax.export with a symbolic batch, for PLATFORMS."""
    return jax.export.export(jax.jit(_portable(inference_function(restored))), platforms=PLATFORMS)(
        _input_spec(restored)
    )


@contextlib.contextmanager
def _converter_chatter_held() -> Iterator[None]:
    """Hold what the converter prints and logs (its plugins' skipped-import tracebacks, debugging prints) and
    show it on stderr only if the conversion fails: a successful export says nothing of it."""
    held = io.StringIO()
    handler = logging.StreamHandler(held)
    logger = logging.getLogger("jax2onnx")
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def onnx_model(restored: Restored, path: str | None = None) -> Any:
    """The inference function converted by jax2onnx with a symbolic batch: an onnx.ModelProto, or written to `path`."""
    with _converter_chatter_held():
        try:
            from jax2onnx import to_onnx
        except ImportError as e:
            raise ExportError(f"ONNX export needs jax2onnx ({e}): pip install 'pmg_jax[onnx]'") from None
        return to_onnx(
            _portable(inference_function(restored)),
            [_input_spec(restored)],
            model_name=restored.config.method,
            input_names=[INPUT_NAME],
            output_names=list(output_names(restored)),
            return_mode="proto" if path is None else "file",
            output_path=path,
        )


def model_card(restored: Restored, fmt: str, files: Sequence[str]) -> dict:
    """What a caller needs besides the model file: classes, the preprocessing to do, input and outputs, source."""
    d, n, method = restored.config.data, len(restored.class_names), methods.get(restored.config.method)
    resize, crop = int(d.resize_size), int(d.crop_size)
    return {
        "format": fmt,
        "files": list(files),
        "class_names": restored.class_names,
        "num_classes": n,
        "resize_size": resize,
        "crop_size": crop,
        "mean": [float(m) for m in d.mean],
        "std": [float(s) for s in d.std],
        "input": {
            "name": INPUT_NAME,
            "layout": "NHWC",
            "dtype": "uint8",
            "shape": ["batch", crop, crop, 3],
            "channels": "RGB",
        },
        "outputs": [
            {
                "name": "probabilities",
                "dtype": "float32",
                "shape": ["batch", n],
                "meaning": f"softmax of the sum of the {len(method.prediction)} heads' logits (the prediction)",
            }
        ]
        + [{"name": h, "dtype": "float32", "shape": ["batch", n], "meaning": f"logits of {h}"} for h in method.heads],
        "preprocessing": {
            "done_by": "the caller: the model takes crops and normalises them itself",
            "steps": [
                "decode the image as RGB (drop alpha; grey to 3 channels)",
                f"resize to {resize}x{resize}, aspect ratio ignored, bilinear and antialiased where a side shrinks "
                "(as PIL's Image.resize(BILINEAR), the reference's; OpenCV INTER_AREA comes close when both sides "
                "shrink, INTER_LINEAR equals it within 1 grey level when none does; training used "
                f"data.resize_backend={d.resize_backend!r})",
                f"centre crop {crop}x{crop} at offset round(({resize} - {crop}) / 2) on both axes",
                "stack as uint8 NHWC (any batch size)",
            ],
            "inside_the_model": f"x / 255, minus mean {list(d.mean)}, divided by std {list(d.std)}",
        },
        "compute_dtype": "float32",
        "source": {
            "run": restored.run,
            "step": restored.step,
            "checkpoint": os.path.join(restored.run, "checkpoints", str(restored.step)),
            "backbone": restored.config.model.backbone,
            "method": method.name,
        },
    }


def export(restored: Restored, fmt: str, out_dir: str) -> str:
    """Write the model in `fmt` and model.json into `out_dir`; returns the model file's path."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    os.makedirs(out_dir, exist_ok=True)
    name = FORMATS[fmt]
    path = os.path.join(out_dir, name)
    if fmt == "stablehlo":
        with open(path, "wb") as f:
            f.write(stablehlo(restored).serialize())
    else:
        onnx_model(restored, path)
    files = [name, *sorted(f for f in os.listdir(out_dir) if f.startswith(name + "."))]  # ONNX's external data
    with open(os.path.join(out_dir, "model.json"), "w") as f:
        json.dump(model_card(restored, fmt, files), f, indent=2)
    return path


def max_relative_difference(ours: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """max |ours - reference| over all the arrays, relative to the largest |reference| (their scale)."""
    scale = max(float(np.max(np.abs(r))) for r in reference)
    return max(
        float(np.max(np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64)))) for o, r in zip(ours, reference)
    ) / max(scale, np.finfo(np.float32).tiny)


if __name__ == "__main__":  # python -m pmg_jax.export: the command lives in pmg_jax.cli.export
    from pmg_jax.cli import export as _command

    _command.run()
