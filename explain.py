"""Grad-CAM of a trained PMG, and how well its maps localise.

  python explain.py --ckpt runs/cub --block 3 --images bird.jpg more/ '*.png'
  python explain.py --evaluate --ckpt runs/cub --split test

--ckpt is a run directory (latest checkpoint, or --checkpoint best), a folder of runs (the most
recent run) or one checkpoint step directory (<run>/checkpoints/<step>). Outputs go to
<run>/explain unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys

import jax
import numpy as np
from tqdm import tqdm

from pmg_jax import cam, localization, train_lib, viz
from pmg_jax.data import decode, pipeline, sources

BLOCK_CHOICES = {"1": ("block1",), "2": ("block2",), "3": ("block3",), "concat": ("concat",),
                 "all": ("block1", "block2", "block3", "concat"),
                 "layer2": ("layer2",), "layer3": ("layer3",), "layer4": ("layer4",)}
HEAD_NAMES = ("head1", "head2", "head3", "concat")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked; adds `maps` (in model order) and resolves the default target."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, folder of runs, or checkpoint step dir")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                   help="which checkpoint of a run (ignored for a step dir)")
    p.add_argument("--images", nargs="+", default=[], help="image files, directories and glob patterns")
    p.add_argument("--block", action="append", choices=tuple(BLOCK_CHOICES),
                   help="map(s) to compute, repeatable (default: all = blocks 1-3 and concat)")
    p.add_argument("--method", action="append", choices=cam.METHODS,
                   help="CAM method, repeatable (default gradcam); several write one subfolder each")
    p.add_argument("--target", default=None,
                   help="predicted | seed | label | <class id> (default: predicted; label with --evaluate)")
    p.add_argument("--concat", choices=cam.CONCAT_MODES, default="seed",
                   help="concat map: seed = sum of the block maps; head = the concat head's gradient")
    p.add_argument("--out", default=None, help="output directory (default <run>/explain)")
    p.add_argument("--batch-size", type=int, default=8, help="images per jitted pass")
    p.add_argument("--save-npy", action="store_true", help="also save each map as .npy (input resolution, [0, 1])")
    p.add_argument("--evaluate", action="store_true", help="localisation metrics on a split with boxes")
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--auc-steps", type=int, default=16, help="deletion/insertion steps (0 skips them)")
    args = p.parse_args(argv)
    args.maps = tuple(n for n in cam.MAP_NAMES if any(n in BLOCK_CHOICES[b] for b in (args.block or ["all"])))
    args.method = list(dict.fromkeys(args.method or ["gradcam"]))
    args.target = args.target or ("label" if args.evaluate else "predicted")
    if args.target not in ("predicted", "seed", "label") and not args.target.isdigit():
        p.error(f"--target must be predicted, seed, label or a class id, not {args.target!r}")
    if args.target == "label" and not args.evaluate:
        p.error("--target label needs known labels: use it with --evaluate")
    if args.target.isdigit() and args.evaluate:
        p.error("--evaluate explains the label, the prediction or the seed target, not a fixed class")
    if not args.evaluate and not args.images:
        p.error("give --images (or --evaluate)")
    if args.batch_size < 1:
        p.error("--batch-size must be positive")
    return args


def collect_images(specs: list[str]) -> tuple[list[str], list[str]]:
    """(image paths, problems): files as given, directories' image files (sorted), glob matches."""
    paths, problems = [], []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                           if os.path.splitext(f)[1].lower() in sources.IMAGE_EXTENSIONS)
            paths += found
            if not found:
                problems.append(f"{spec}: no images in this directory")
        elif glob.has_magic(spec):
            found = sorted(glob.glob(spec))
            paths += found
            if not found:
                problems.append(f"{spec}: no file matches")
        else:
            paths.append(spec)
    return list(dict.fromkeys(paths)), problems


def unique_tags(paths: list[str]) -> list[str]:
    """File stems, with _2, _3, ... appended where two images share one."""
    seen: dict[str, int] = {}
    tags = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        tags.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return tags


def _print_top5(path: str, probs: list[np.ndarray], class_names: list[str]) -> None:
    """The image's path, then one line per head with its five most probable classes."""
    lines = [f"  {head:<7} " + " | ".join(f"{name} {100 * q:.1f}%" for name, q in viz.top_k(p, class_names))
             for head, p in zip(HEAD_NAMES, probs)]
    tqdm.write("\n".join([path, *lines]))


def _read_batch(paths: list[str], tags: list[str]) -> list[tuple[str, str, np.ndarray]]:
    """(path, tag, RGB image) of the readable images; one line on stderr for each other file."""
    loaded = []
    for path, tag in zip(paths, tags):
        try:
            loaded.append((path, tag, decode.read_image(path)))
        except decode.UnreadableImage as e:
            tqdm.write(f"skipping {path}: {e}", file=sys.stderr)
    return loaded


def _titles(path: str, image: np.ndarray, maps: tuple[str, ...], top: list[tuple[str, float]]) -> dict[str, list[str]]:
    """Grid titles: the file and its size, then each map with its head's top class and probability."""
    titles = {"input": [os.path.basename(path), f"{image.shape[1]}x{image.shape[0]}"]}
    for name in maps:
        head = cam.HEAD_OF[name]
        titles[name] = [f"{viz.map_label(name)} ({HEAD_NAMES[head]})", f"{top[head][0]} {100 * top[head][1]:.0f}%"]
    return titles


def explain_images(args, run: str, model, variables, config, class_names: list[str]) -> int:
    """Write overlays, grids and index.html for every readable image; return the exit status."""
    paths, problems = collect_images(args.images)
    for problem in problems:
        print(f"skipping {problem}", file=sys.stderr)
    target = "class" if args.target.isdigit() else args.target
    if target == "class" and int(args.target) >= len(class_names):
        print(f"--target {args.target}: the model has {len(class_names)} classes", file=sys.stderr)
        return 2
    out_root = args.out or os.path.join(run, "explain")
    outs = {m: out_root if len(args.method) == 1 else os.path.join(out_root, m) for m in args.method}
    for d in outs.values():
        os.makedirs(d, exist_ok=True)
    explainers = {m: cam.make_explainer(model, args.maps, m, target, args.concat) for m in args.method}
    size, mean, std = config.data.crop_size, tuple(config.data.mean), tuple(config.data.std)
    classes = np.full(args.batch_size, int(args.target) if target == "class" else 0, np.int32)
    gallery: dict[str, list] = {m: [] for m in args.method}
    tags = unique_tags(paths)
    bar = tqdm(total=len(paths), unit="image", desc="explain", dynamic_ncols=True)
    for start in range(0, len(paths), args.batch_size):
        chunk = slice(start, start + args.batch_size)
        loaded = _read_batch(paths[chunk], tags[chunk])
        if loaded:
            x = np.zeros((args.batch_size, size, size, 3), np.float32)  # padded: one compiled shape
            x[:len(loaded)] = [cam.prepare(image, size, mean, std) for _, _, image in loaded]
        for method, explainer in explainers.items() if loaded else ():
            out = jax.device_get(explainer(variables, x, classes))
            probs = [np.asarray(jax.nn.softmax(z)) for z in out.logits]
            for i, (path, tag, image) in enumerate(loaded):
                top = [viz.top_k(p[i], class_names, 1)[0] for p in probs]
                grid_name = viz.save_explanation(outs[method], tag, image, {n: out.maps[n][i] for n in args.maps},
                                                 _titles(path, image, args.maps, top), args.save_npy)
                gallery[method].append((grid_name, [path, *(f"{h}: {n} {100 * q:.1f}%" for h, (n, q) in
                                                            zip(HEAD_NAMES, top))]))
                if method == args.method[0]:
                    _print_top5(path, [p[i] for p in probs], class_names)
        bar.update(len(paths[chunk]))
    bar.close()
    done = len(gallery[args.method[0]])
    for method, entries in gallery.items():
        if entries:
            viz.write_index(os.path.join(outs[method], "index.html"), entries,
                            f"{method} of {', '.join(args.maps)} ({run})")
    if not done:
        print(f"explain.py: none of the {len(paths)} inputs could be read as an image", file=sys.stderr)
        return 1
    print(f"explained {done} of {len(paths)} images ({', '.join(args.maps)}; {', '.join(args.method)}, target "
          f"{args.target}) -> {os.path.join(out_root, 'index.html' if len(outs) == 1 else '*/index.html')}")
    return 0


class _Prefix:
    """The first n examples of a random-access source."""

    def __init__(self, source: pipeline.Source, n: int):
        """Wrap `source`, keeping at most `n` examples."""
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        """Number of examples kept."""
        return self.n

    def __getitem__(self, index: int) -> dict:
        """The source's record `index`."""
        return self.source[index]


def evaluate(args, run: str, model, variables, config) -> int:
    """Print (and save as JSON) the localisation tables of a split with boxes."""
    source = sources.make_source(config, args.split)
    if len(source) == 0 or (source[0].get("box") is None and source[0].get("rel_box") is None):
        print(f"split {args.split!r} of {config.dataset.name} has no boxes to evaluate against", file=sys.stderr)
        return 2
    if args.max_images:
        source = _Prefix(source, args.max_images)
    spec = train_lib.transform_spec(config)
    _, batches = pipeline.eval_batches(source, spec, pipeline.host_layout(args.batch_size), with_box=True)
    target = {"label": "class"}.get(args.target, args.target)
    with tqdm(total=len(source), unit="image", desc=f"evaluate {args.split}", dynamic_ncols=True) as bar:
        report = localization.evaluate(model, variables, batches, spec, maps=args.maps, methods=args.method,
                                       target=target, concat=args.concat, auc_steps=args.auc_steps,
                                       progress=bar.update)
    print(localization.format_tables(report, f" on {config.dataset.name} {args.split} (target {args.target})"))
    out_dir = args.out or os.path.join(run, "explain")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"localization_{args.split}.json")
    with open(path, "w") as f:
        json.dump({"target": args.target, "concat": args.concat, **report}, f, indent=2)
    print(f"saved {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        r = train_lib.restore(args.ckpt, args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"explain.py: cannot load a checkpoint from {args.ckpt}: {e}", file=sys.stderr)
        return 2
    print(f"using {r.run} checkpoint {r.step} (epoch {r.meta.get('epoch')}, {r.config.model.backbone}, "
          f"{len(r.class_names)} classes, input {r.config.data.crop_size}px)")
    if args.evaluate:
        return evaluate(args, r.run, r.model, r.variables, r.config)
    return explain_images(args, r.run, r.model, r.variables, r.config, r.class_names)


if __name__ == "__main__":
    sys.exit(main())
