"""The reference's whole training loop in PyTorch, on an ImageFolder dataset (DATA/train/<class>/, DATA/test/<class>/).

python -m bench.reference_train --data DIR --out metrics.jsonl [--width 16 --stage-sizes 1 1 1 1 --feature-size 64
    --resize 112 --crop 96 --pad 0 --epochs 12 --batch 16 --lr-new 0.005 --lr-backbone 0.005 --seed 0]

What the PMG reference's train.py does, from /work/shared/pmg_reference.md, with the model, optimizer,
iteration and jigsaw of `bench/torch_reference.py` and the data path rebuilt from PIL and torch (torchvision
does not import beside a CPU torch): torchvision's ImageFolder (classes = the sorted folders, files sorted),
Resize((R, R)) on the PIL image (bilinear), RandomCrop(C, padding=P) with zero fill, RandomHorizontalFlip,
ToTensor, Normalize(0.5, 0.5); the test side Resize((R, R)), CenterCrop(C). `torch.manual_seed(seed)` seeds
initialisation, the shuffle and the augmentation, and a `random.Random(seed)` the jigsaw cycles (the reference
leaves Python's `random` unseeded). Batches smaller than --batch are skipped, as the reference does.

Writes one JSON line per epoch to --out (and stdout): the mean of each head's training loss over the epoch
(loss_concat includes its weight 2, as the reference logs it), the train accuracy of the concat pass, and the
test accuracy in % of every head and of combined (argmax of the summed logits). The first line describes the
data ({"data": {"train": N, "test": N, "classes": [...]}}).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
from PIL import Image

from bench import torch_reference as ref

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
HEADS = ("head1", "head2", "head3", "concat")
LOSSES = ("loss1", "loss2", "loss3", "loss_concat")


def image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """torchvision's ImageFolder listing: (path, class index) for every image under root/<class>/, classes sorted."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise SystemExit(f"error: {root}: no class folders")
    samples = []
    for index, name in enumerate(classes):
        for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples.extend(
                (os.path.join(dirpath, f), index) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
    return samples, classes


def load_resized(samples: list[tuple[str, int]], size: int) -> list[Image.Image]:
    """Each image opened as RGB and resized to (size, size) with PIL's bilinear filter, as Resize((R, R)) does.

    The resize is deterministic, so it is done once rather than every epoch."""
    out = []
    for path, _ in samples:
        with Image.open(path) as im:
            out.append(im.convert("RGB").resize((size, size), Image.BILINEAR))
    return out


def to_normalized(image: Image.Image) -> torch.Tensor:
    """ToTensor then Normalize(mean 0.5, std 0.5): CHW float in [-1, 1]."""
    t = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    return t.sub_(0.5).div_(0.5)


def train_view(image: Image.Image, crop: int, pad: int) -> torch.Tensor:
    """RandomCrop(crop, padding=pad) then RandomHorizontalFlip(0.5), drawing from torch's global generator like
    torchvision (the offsets with torch.randint, the flip with torch.rand), then ToTensor and Normalize."""
    t = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1)
    if pad:
        t = torch.nn.functional.pad(t, (pad, pad, pad, pad), value=0)
    h, w = t.shape[1:]
    top = left = 0
    if (h, w) != (crop, crop):
        top = int(torch.randint(0, h - crop + 1, size=(1,)).item())
        left = int(torch.randint(0, w - crop + 1, size=(1,)).item())
    t = t[:, top : top + crop, left : left + crop]
    if torch.rand(1).item() < 0.5:
        t = t.flip(-1)
    return t.float().div_(255.0).sub_(0.5).div_(0.5)


def test_view(image: Image.Image, crop: int) -> torch.Tensor:
    """CenterCrop(crop) (torchvision's offset: round((size - crop) / 2)), ToTensor and Normalize."""
    w, h = image.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return to_normalized(image.crop((left, top, left + crop, top + crop)))


def evaluate(model: ref.PMG, images: torch.Tensor, labels: torch.Tensor, batch: int) -> dict[str, float]:
    """Test accuracy (%) of every head and of combined (argmax of the sum of the four raw logits)."""
    hits = torch.zeros(len(HEADS) + 1)
    for i in range(0, len(labels), batch):
        logits = ref.evaluate_logits(model, images[i : i + batch])
        preds = [*logits, sum(logits)]
        hits += torch.tensor([float((p.argmax(-1) == labels[i : i + batch]).sum()) for p in preds])
    return {name: 100.0 * float(h) / len(labels) for name, h in zip((*HEADS, "combined"), hits)}


def train(args: argparse.Namespace) -> None:
    """Train and evaluate every epoch, one JSON line per epoch."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    jigsaw_rng = random.Random(args.seed)
    train_samples, classes = image_folder(os.path.join(args.data, "train"))
    test_samples, test_classes = image_folder(os.path.join(args.data, "test"))
    if test_classes != classes:
        raise SystemExit(f"error: {args.data}: test/ and train/ have different class folders")
    train_images = load_resized(train_samples, args.resize)
    train_labels = torch.tensor([label for _, label in train_samples])
    test_images = torch.stack([test_view(im, args.crop) for im in load_resized(test_samples, args.resize)])
    test_labels = torch.tensor([label for _, label in test_samples])

    model = ref.PMG(
        ref.make_resnet("resnet50", args.width, args.stage_sizes),
        feature_size=args.feature_size,
        num_classes=len(classes),
    )
    optimizer = ref.make_optimizer(model, lr_new=args.lr_new, lr_backbone=args.lr_backbone)
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 (written line by line over the run)

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit({"data": {"train": len(train_samples), "test": len(test_samples), "classes": classes}})
    steps = len(train_samples) // args.batch
    for epoch in range(args.epochs):
        start = time.perf_counter()
        ref.set_lr(optimizer, epoch, args.epochs)
        order = torch.randperm(len(train_samples))  # DataLoader(shuffle=True) draws from torch's generator
        sums = dict.fromkeys((*LOSSES, "accuracy"), 0.0)
        for s in range(steps):  # the last, smaller batch is skipped
            index = order[s * args.batch : (s + 1) * args.batch]
            images = torch.stack([train_view(train_images[i], args.crop, args.pad) for i in index.tolist()])
            result = ref.train_iteration(model, optimizer, images, train_labels[index], rng=jigsaw_rng)
            for k in LOSSES:
                sums[k] += result[k]
            sums["accuracy"] += 100.0 * result["train_acc"]
        record = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}}
        record["test"] = evaluate(model, test_images, test_labels, args.eval_batch)
        record["seconds"] = time.perf_counter() - start
        emit(record)
    if out:
        out.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reference_train", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ class folders")
    p.add_argument("--out", default="", help="JSON lines file to write (besides stdout)")
    p.add_argument("--width", type=int, default=64, help="ResNet base width (configs/demo.py: 16)")
    p.add_argument("--stage-sizes", type=int, nargs=4, default=[3, 4, 6, 3], help="bottlenecks per stage")
    p.add_argument("--feature-size", type=int, default=512, help="channels of each block's 1x1 conv")
    p.add_argument("--resize", type=int, default=550, help="Resize((R, R))")
    p.add_argument("--crop", type=int, default=448, help="RandomCrop / CenterCrop size")
    p.add_argument("--pad", type=int, default=8, help="RandomCrop padding")
    p.add_argument("--epochs", type=int, default=200, help="epochs, also the cosine's period")
    p.add_argument("--batch", type=int, default=16, help="training batch")
    p.add_argument("--eval-batch", type=int, default=64, help="evaluation batch (no effect on the numbers)")
    p.add_argument("--lr-new", type=float, default=0.002, help="learning rate of the blocks and heads")
    p.add_argument("--lr-backbone", type=float, default=0.0002, help="learning rate of the ResNet trunk")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed and the jigsaw's random.Random")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = p.parse_args(argv)
    for flag in ("train", "test"):
        if not os.path.isdir(os.path.join(args.data, flag)):
            p.error(f"--data {args.data}: no {flag}/ folder of class folders")
    if args.crop > args.resize + 2 * args.pad:
        p.error(f"--crop {args.crop} is larger than --resize {args.resize} plus twice --pad {args.pad}")
    return args


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
