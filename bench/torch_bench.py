"""Benchmark the PyTorch reference PMG (bench/torch_reference.py): training iterations or evaluation.

    python -m bench.torch_bench --mode train --size 448 --batch 16 --dtype bfloat16 --device cuda

bfloat16 is the reference's natural mixed precision: `torch.autocast` over float32
parameters. On CPU the intra-op threads are set to the cores XLA uses (--threads).
Prints one JSON line per measurement, the headline last, as bench/train.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import resource
from typing import Any

import torch

from bench import common, flops
from bench import torch_reference as ref
from pmg_jax import backbones


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device),
            "memory_source": "torch.cuda.max_memory_allocated",
        }
    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_source": "process max RSS",
    }


def _device_info(device: torch.device) -> dict[str, Any]:
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"platform": device.type, "device_kind": kind, "devices": 1}


def prepare(mode: str, size: int, batch: int, dtype: str, device: str = "cpu", **model: Any) -> common.Prepared:
    """The reference model on `device` and one synthetic batch; `run` does one training iteration or eval."""
    dev = torch.device(device)
    torch.manual_seed(0)
    width = backbones.resolve(model["backbone"], model["width"]).width  # 0: the backbone's standard
    net = ref.PMG(
        ref.make_resnet(model["backbone"], width, model["stage_sizes"]), model["feature_size"], model["num_classes"]
    ).to(dev)
    data = common.synthetic_batch(size, batch, model["num_classes"])
    images = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).contiguous().to(dev)
    labels = torch.from_numpy(data["label"]).long().to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    if mode == "train":
        optimizer, rng = ref.make_optimizer(net), random.Random(0)
        step = lambda: ref.train_iteration(net, optimizer, images, labels, rng=rng)
    else:
        step = lambda: ref.evaluate_logits(net, images)

    def run() -> None:
        with autocast:
            step()
        _sync(dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    return common.Prepared(run, compile_s=0.0, memory=lambda: _memory(dev), device=_device_info(dev))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the headline record."""
    parser = common.add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=common.cpu_threads(), help="torch intra-op threads on CPU")
    parser.add_argument(
        "--no-cudnn-benchmark",
        dest="cudnn_benchmark",
        action="store_false",
        help="leave cuDNN's algorithm search off (the original code does not turn it on); by "
        "default it is on, the reference's fastest usual setting, and the warm-up runs it",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    model = common.model_kwargs(args)
    try:
        prepared = prepare(args.mode, args.size, args.batch, args.dtype, args.device, **model)
    except ValueError as e:  # the reference builds torchvision ResNets only
        parser.error(f"--backbone {args.backbone}: {e}")
    count = flops.train_iteration_flops if args.mode == "train" else flops.eval_flops
    return common.measure(
        f"torch_{args.mode}",
        prepared,
        args,
        count(args.batch, size=args.size, **model),
        threads=torch.get_num_threads(),
        cudnn_benchmark=args.cudnn_benchmark,
    )


if __name__ == "__main__":
    main()
