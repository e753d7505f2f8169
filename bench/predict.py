"""Batch prediction speed: predict's jitted path (JAX) against the exported ONNX model under onnxruntime.

    python -m bench.predict [--size 448] [--batch 8] [--rounds 5] [--method pmg|pmg_v2]

ResNet50 PMG (or `--method`'s network) with random weights on one batch of uint8 crops. JAX runs
`predict.make_predictor`'s function (transfer, normalisation, model, softmax); onnxruntime runs
`export.onnx_model` on as many intra-op threads as XLA's CPU pool has. They alternate, one call each per
round, so that load from other processes hits both alike. Also prints the largest logit difference of the ONNX
and the StableHLO exports from JAX, relative to the logits' scale (`export.max_relative_difference`). One JSON
line per measurement, the headline last (medians and their ratio, onnx over jax).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from bench import common
from pmg_jax import export, methods, predict
from pmg_jax import state as state_lib


def random_run(args: argparse.Namespace) -> predict.Restored:
    """A checkpoint-like PMG of `args` with random weights (PyTorch-style initialisation)."""
    config = common.make_config(args, method=args.method)
    model = state_lib.create_model(config)
    variables = state_lib.init_variables(model, jax.random.PRNGKey(config.seed), args.size)
    return predict.Restored(
        "(random weights)", 0, model, variables, config, {"class_names": [f"class_{i}" for i in range(args.classes)]}
    )


def timed_s(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the headline record."""
    import onnxruntime

    parser = common.add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.set_defaults(batch=8)
    parser.add_argument("--method", choices=tuple(methods.METHODS), default="pmg", help="config.method")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each, alternating")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds idle between the two, so threads settle")
    args = parser.parse_args(argv)
    restored = random_run(args)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    tags = {
        "bench": "predict",
        "method": args.method,
        "size": args.size,
        "batch": args.batch,
        "dtype": args.dtype,
        "backbone": args.backbone,
    }

    predictor = predict.make_predictor(restored, args.batch)
    run_jax = lambda: jax.block_until_ready(predictor.run_batch(images))  # noqa: E731
    first_s, (logits, _) = timed_s(run_jax)  # compiles
    common.emit({**tags, "kind": "compile", "impl": "jax", "first_call_s": first_s})
    reference = [np.asarray(logits[:, i]) for i in range(1, len(predictor.outputs))]  # each head's, after combined

    onnx_s, proto = timed_s(lambda: export.onnx_model(restored))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = common.cpu_threads()
    session_s, session = timed_s(
        lambda: onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    )
    common.emit({**tags, "kind": "compile", "impl": "onnx", "export_s": onnx_s, "session_s": session_s})
    run_onnx = lambda: session.run(None, {export.INPUT_NAME: images})  # noqa: E731
    onnx_diff = export.max_relative_difference(run_onnx()[1:], reference)
    shlo_s, exported = timed_s(lambda: export.stablehlo(restored))
    shlo_diff = export.max_relative_difference([np.asarray(o) for o in exported.call(images)[1:]], reference)
    common.emit(
        {
            **tags,
            "kind": "parity",
            "onnx_max_rel_logit_diff": onnx_diff,
            "stablehlo_max_rel_logit_diff": shlo_diff,
            "stablehlo_export_s": shlo_s,
        }
    )

    seconds: dict[str, list[float]] = {"jax": [], "onnx": []}
    for r in range(args.warmup + args.rounds):
        for impl, fn in (("jax", run_jax), ("onnx", run_onnx)):
            s = common.timed(fn)
            time.sleep(args.pause)
            if r >= args.warmup:
                seconds[impl].append(s)
                common.emit(
                    {
                        **tags,
                        "kind": "step",
                        "impl": impl,
                        "round": r - args.warmup,
                        "seconds": s,
                        "images_per_s": args.batch / s,
                    }
                )
    rates = {impl: args.batch / statistics.median(s) for impl, s in seconds.items()}
    headline = {
        **tags,
        "kind": "headline",
        "jax_images_per_s": rates["jax"],
        "onnx_images_per_s": rates["onnx"],
        "onnx_over_jax": rates["onnx"] / rates["jax"],
        "rounds": args.rounds,
        "onnx_max_rel_logit_diff": onnx_diff,
        "stablehlo_max_rel_logit_diff": shlo_diff,
        "jax_first_call_s": first_s,
        "onnx_export_s": onnx_s,
        "onnx_session_s": session_s,
        "stablehlo_export_s": shlo_s,
        "threads": common.cpu_threads(),
        "onnxruntime": onnxruntime.__version__,
        **common.peak_memory(),
        **common.device_info(),
    }
    common.emit(headline)
    return headline


if __name__ == "__main__":
    main()
