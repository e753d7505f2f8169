"""Grad-CAM throughput: one jitted pass for a batch and all four maps, against the seed's way.

    python -m bench.cam --size 448 --batch 8 --steps 2

Maps: block1, block2, block3 and the seed's concat, Grad-CAM of the seed target (0.5 * sum_c z_c^2
of each block's head), ResNet50 PMG with random weights on synthetic input. Measured in one run:

  one_pass       `cam.make_explainer`: one forward for the batch, one backward per head.
  seed_way       what the seed does: one image and one block per forward/backward, and (as a
                 hooked PyTorch model's loss.backward() does) the backward also fills every
                 parameter's gradient; the concat map is assembled from the three block maps.
  per_image_block  one image and one block per pass, but only the map's gradient (no parameter
                 gradients): isolates what batching and sharing the forward buy.

Prints one JSON line per measurement (compile, then each timed step with `images_per_s`), then
the headline last: `ratio` = one_pass / seed_way images per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from pmg_jax import backbones, cam, kernels, methods, xla_options
from pmg_jax.model import PMG

MAPS = ("block1", "block2", "block3", "concat")
SEED = cam.CamOptions(MAPS, "gradcam", "seed")  # the seed's target: 0.5 * sum_c z_c^2


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line and flush it."""
    print(json.dumps(record), flush=True)


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call of `fn` (which blocks until its work is done)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def block_pass(model: PMG, block: str, with_param_grads: bool) -> Callable:
    """One image, one block: forward, backward of that block's head's seed score, raw Grad-CAM map."""
    head = cam.head_of(methods.PMG, block)

    def run(variables: dict, image: jax.Array):
        zeros = cam.perturbation_zeros(model, variables, image)

        def score(params, perturbation):
            logits, state = model.apply(
                {
                    "params": params,
                    "batch_stats": variables["batch_stats"],
                    "perturbations": {**zeros, block: perturbation},
                },
                image,
                train=False,
                mutable=["intermediates"],
            )
            return jnp.sum(cam.target_score(logits[head], SEED)), state["intermediates"][block][0]

        argnums = (0, 1) if with_param_grads else 1
        grads, act = jax.grad(score, argnums=argnums, has_aux=True)(variables["params"], zeros[block])
        param_grads, g = grads if with_param_grads else (None, grads)
        return cam.raw_map("gradcam", act, g), param_grads  # parameter gradients returned: never dead code

    return xla_options.jit(run)


def seed_concat(size: tuple[int, int]) -> Callable:
    """The seed's block and concat maps from three raw block maps."""

    def run(raws: list[jax.Array]) -> list[jax.Array]:
        blocks = [cam.upsample(cam.normalize(r), size) for r in raws]
        return [*blocks, cam.normalize(sum(cam.upsample(r, size) for r in raws))]

    return xla_options.jit(run)


def per_image_runner(model: PMG, variables: dict, images: np.ndarray, with_param_grads: bool) -> tuple[Callable, float]:
    """(run over the whole batch image by image and block by block, compile seconds)."""
    one = images[:1]
    passes, compile_s = {}, 0.0
    for block in cam.BLOCKS:
        fn = block_pass(model, block, with_param_grads)
        compile_s += seconds(lambda block=block, fn=fn: passes.__setitem__(block, fn.lower(variables, one).compile()))
    raws = [passes[b](variables, one)[0] for b in cam.BLOCKS]
    finish = seed_concat(images.shape[1:3])
    compile_s += seconds(lambda: finish.lower(raws).compile())

    def run() -> None:
        for i in range(len(images)):
            image = images[i : i + 1]
            jax.block_until_ready(finish([passes[b](variables, image)[0] for b in cam.BLOCKS]))

    return run, compile_s


def one_pass_runner(model: PMG, variables: dict, images: np.ndarray) -> tuple[Callable, float]:
    """(run the jitted explainer on the batch once, compile seconds)."""
    explainer = cam.make_explainer(model, SEED)
    compiled = {}
    compile_s = seconds(lambda: compiled.setdefault("fn", explainer.lower(variables, images).compile()))
    return lambda: jax.block_until_ready(compiled["fn"](variables, images)), compile_s


def measure(name: str, runner: tuple[Callable, float], args: argparse.Namespace, tags: dict) -> float:
    """Print compile time and each timed step (after one untimed run); return the median images/s."""
    run, compile_s = runner
    emit({**tags, "mode": name, "kind": "compile", "seconds": compile_s})
    run()
    rates = []
    for step in range(args.steps):
        s = seconds(run)
        rates.append(args.batch / s)
        emit({**tags, "mode": name, "kind": "step", "step": step, "seconds": s, "images_per_s": rates[-1]})
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> dict:
    """Run the three modes on one synthetic batch; returns the headline record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=448, help="input side (divisible by 32)")
    p.add_argument("--batch", type=int, default=8, help="images per one-pass call")
    p.add_argument("--steps", type=int, default=2, help="timed iterations of each mode")
    p.add_argument(
        "--backbone",
        default="resnet50",
        choices=tuple(backbones.REGISTRY),
        help="a registered backbone (pmg_jax.backbones)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument(
        "--width", type=int, default=0, help="base width; 0 = the backbone's standard (small for smoke runs)"
    )
    p.add_argument("--stage-sizes", default=None, help="blocks per stage, e.g. 1,1,1,1 (smoke runs)")
    p.add_argument("--feature-size", type=int, default=512, help="channels of the blocks' 1x1 convs (smoke runs)")
    args = common.add_winograd_arg(p).parse_args(argv)
    with kernels.use(kernels.Kernels(winograd=args.winograd)):  # every pass below is traced in here
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    """The three ways, measured; returns the headline."""
    stage_sizes = tuple(int(s) for s in args.stage_sizes.split(",")) if args.stage_sizes else None
    model = PMG(
        num_classes=200,
        backbone=args.backbone,
        feature_size=args.feature_size,
        width=args.width,
        stage_sizes=stage_sizes,
        dtype=jnp.dtype(args.dtype),
    )
    x = jnp.zeros((1, args.size, args.size, 3))
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x, train=False))()
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    images = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    device = jax.devices()[0]
    tags = {
        "bench": "cam",
        "size": args.size,
        "batch": args.batch,
        "dtype": args.dtype,
        "backbone": args.backbone,
        "maps": list(MAPS),
        "method": "gradcam",
        "target": "seed",
        "winograd": args.winograd,
        "platform": device.platform,
        "device_kind": device.device_kind,
    }
    rates = {
        "one_pass": measure("one_pass", one_pass_runner(model, variables, images), args, tags),
        "seed_way": measure("seed_way", per_image_runner(model, variables, images, True), args, tags),
        "per_image_block": measure("per_image_block", per_image_runner(model, variables, images, False), args, tags),
    }
    headline = {
        **tags,
        "kind": "headline",
        **{f"{k}_images_per_s": v for k, v in rates.items()},
        "images_per_s": rates["one_pass"],
        "ratio": rates["one_pass"] / rates["seed_way"],
        "ratio_vs_per_image_block": rates["one_pass"] / rates["per_image_block"],
        **common.peak_memory(),
    }
    emit(headline)
    return headline


if __name__ == "__main__":
    main()
