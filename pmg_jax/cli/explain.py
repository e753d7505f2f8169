"""Grad-CAM of a trained PMG, and how well its maps localise.

  python explain.py --ckpt runs/ --block 3                 # a sample of the run's own test split
  python explain.py --ckpt runs/cub --block 3 --images bird.jpg more/ '*.png'
  python explain.py --ckpt runs/cub --target finer --finer-k 3 --images bird.jpg
  python explain.py --evaluate --ckpt runs/cub --split test        # tables, JSON and report.html

--ckpt is a run directory (latest checkpoint, or --checkpoint best), a folder of runs (the one with the
newest checkpoint) or one checkpoint step directory (<run>/checkpoints/<step>). Without --images it
explains --num-images examples spread evenly over the checkpoint's own --split. Outputs go to
<run>/explain unless --out says otherwise; index.html there lists every grid in the folder. --evaluate
measures localisation on a split with boxes and part attribution on one with parts, in one pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from tqdm import tqdm

from pmg_jax import cam, explain, localization, methods, parts
from pmg_jax import model as model_lib
from pmg_jax.cli import common
from pmg_jax.data import sources
from pmg_jax.errors import check_writable

PROG = "explain.py"
# --block values: blocks by number, PMG's concat map, the combined prediction's map (PMG-V2), the run's method's
# default maps (all: the blocks and its summed map; `cam.default_maps`), or a backbone stage by name
BLOCK_CHOICES = {
    **{str(k): (b,) for k, b in enumerate(model_lib.BLOCKS, start=1)},
    "concat": ("concat",),
    "combined": (model_lib.COMBINED,),
    "all": (),
    **{s: (s,) for s in model_lib.STAGES},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked; resolves the default target and adds `options`, the CAM options it asks for."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_checkpoint_flags(p)
    p.add_argument("--images", nargs="+", default=[], help="image files, directories and glob patterns")
    p.add_argument(
        "--num-images",
        type=int,
        default=16,
        help="without --images: how many examples of --split to explain (spread evenly over it)",
    )
    p.add_argument(
        "--block",
        action="append",
        choices=tuple(BLOCK_CHOICES),
        help="map(s) to compute, repeatable (default: all = blocks 1-3 and the run's summed map: concat for "
        "PMG, combined for PMG-V2); concat is PMG's, combined PMG-V2's",
    )
    p.add_argument(
        "--method",
        action="append",
        choices=cam.METHODS,
        help="CAM method, repeatable (default gradcam); several write one subfolder each",
    )
    p.add_argument(
        "--target",
        default=None,
        help="predicted | seed | label | finer | <class id> (default: predicted; label with --evaluate); "
        "finer: Finer-CAM, the prediction (with --evaluate: the label) against its nearest classes",
    )
    p.add_argument(
        "--finer-k",
        type=int,
        default=None,
        help=f"with --target finer: how many classes nearest by logit to contrast with (default {cam.FINER_K})",
    )
    p.add_argument(
        "--finer-alpha",
        type=float,
        default=None,
        help=f"with --target finer: weight of the nearest classes' logits (default {cam.FINER_ALPHA:g})",
    )
    p.add_argument(
        "--concat",
        choices=cam.CONCAT_MODES,
        default="seed",
        help="concat map: seed = sum of the block maps; head = the concat head's gradient",
    )
    p.add_argument("--out", default=None, help="output directory (default <run>/explain)")
    p.add_argument("--batch-size", type=int, default=8, help="images per jitted pass")
    p.add_argument("--save-npy", action="store_true", help="also save each map as .npy (input resolution, [0, 1])")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="localisation (split with boxes) and part tables (split with parts), JSON and report.html",
    )
    p.add_argument(
        "--split", default="test", choices=sources.SPLITS, help="split to evaluate, or to sample without --images"
    )
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--auc-steps", type=int, default=16, help="deletion/insertion steps (0 skips them)")
    p.add_argument("--per-class", action="store_true", help="with --evaluate: also print the part tables per class")
    p.add_argument(
        "--report-images",
        type=int,
        default=8,
        help="with --evaluate: how many of the images whose blocks disagree most report.html shows",
    )
    common.add_max_pixels_option(p)
    args = p.parse_args(argv)
    args.target = args.target or ("label" if args.evaluate else "predicted")
    if args.target not in ("predicted", "seed", "label", "finer") and not args.target.isdigit():
        p.error(f"--target must be predicted, seed, label, finer or a class id, not {args.target!r}")
    if args.target == "label" and not args.evaluate:
        p.error("--target label needs known labels: use it with --evaluate")
    if args.target.isdigit() and args.evaluate:
        p.error("--evaluate explains the label, the prediction or the seed target, not a fixed class")
    for flag in ("batch_size", "num_images"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if args.report_images < 0:
        p.error("--report-images must be 0 or more")
    args.options = cam_options(p, args)
    return args


# the flag that sets each field of cam.CamOptions
OPTION_FLAGS = {
    "maps": "--block",
    "methods": "--method",
    "target": "--target",
    "concat": "--concat",
    "finer_k": "--finer-k",
    "finer_alpha": "--finer-alpha",
}


def cam_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> cam.CamOptions:
    """The CAM options of the flags (Finer-CAM's only with --target finer), refused as a usage error naming the
    flag when they cannot work. Its maps are those --block names but `all` (None for --block all alone or none:
    `maps_for` adds the run's method's defaults and checks the maps against its method once it is restored)."""
    given = {f: getattr(args, f) for f in ("finer_k", "finer_alpha") if getattr(args, f) is not None}
    if given and args.target != "finer":
        p.error(f"{OPTION_FLAGS[next(iter(given))]} needs --target finer")
    try:
        return cam.CamOptions(
            maps=tuple(n for n in cam.MAP_NAMES if any(n in BLOCK_CHOICES[b] for b in args.block or ())) or None,
            methods=tuple(args.method or ["gradcam"]),
            target="class" if args.target == "label" or args.target.isdigit() else args.target,
            concat=args.concat,
            **given,
        )
    except cam.CamOptionsError as e:
        p.error(OPTION_FLAGS[e.field] + str(e).removeprefix(e.field))


def maps_for(args: argparse.Namespace, method: methods.Method) -> cam.CamOptions:
    """args.options for a run of `method`: --block all (or none) adds the method's default maps; a map the method
    does not have is refused in one line naming --block and the method's maps."""
    options = args.options
    if "all" in (args.block or ["all"]):
        options = dataclasses.replace(options, maps=(*(options.maps or ()), *cam.default_maps(method)))
    try:
        return options.for_method(method)
    except cam.CamOptionsError as e:
        raise cam.CamOptionsError(e.field, OPTION_FLAGS[e.field] + str(e).removeprefix(e.field)) from None


def _print_top5(result: explain.Explained, class_names: list[str]) -> None:
    """The image's origin, then one line per output (the heads, then the combined prediction) with its five most
    probable classes."""
    lines = [
        f"  {head:<8} " + " | ".join(f"{name} {100 * q:.1f}%" for name, q in result.top(head, 5, class_names))
        for head in result.probabilities
    ]
    tqdm.write("\n".join([result.item.origin, *lines]))


def explain_images(args: argparse.Namespace, restored) -> int:
    """Write overlays, grids and the gallery for the chosen images; return the exit status."""
    if args.target.isdigit() and int(args.target) >= len(restored.class_names):
        print(f"{PROG}: --target {args.target}: the model has {len(restored.class_names)} classes", file=sys.stderr)
        return 2
    if args.images:
        paths, items, problems = explain.from_files(args.images, restored.config.data.max_image_pixels)
        total = len(paths)
    else:
        problems = []
        indices, items = explain.from_split(restored.config, args.split, args.num_images, problems)
        total = len(indices)
        print(
            f"no --images: explaining {total} examples spread over the {args.split} split of "
            f"{restored.config.dataset.name} (--num-images, --split)"
        )
    for problem in problems:  # found while collecting; unreadable files are added while reading
        print(f"skipping {problem}", file=sys.stderr)
    reported = len(problems)
    out_root = args.out
    bar = tqdm(total=total, unit="image", desc="explain", dynamic_ncols=True)
    explained = 0

    def done(result: explain.Explained) -> None:
        nonlocal reported, explained
        explained += 1
        for problem in problems[reported:]:
            tqdm.write(f"skipping {problem}", file=sys.stderr)
        reported = len(problems)
        _print_top5(result, restored.class_names)
        bar.update(1)

    options = args.options
    explain.explain(  # streamed: each image's files are written as it is done, and not kept
        restored,
        items,
        options=options,
        class_id=int(args.target) if args.target.isdigit() else None,
        batch_size=args.batch_size,
        out_dir=out_root,
        save_npy=args.save_npy,
        on_result=done,
        keep=False,
    )
    bar.close()
    for problem in problems[reported:]:
        print(f"skipping {problem}", file=sys.stderr)
    if not explained:
        print(f"{PROG}: none of the {total} inputs could be read as an image", file=sys.stderr)
        return 1
    index = os.path.join(out_root, "index.html" if len(options.methods) == 1 else "*/index.html")
    print(
        f"explained {explained} of {total} images ({', '.join(options.maps)}; {', '.join(options.methods)}, target "
        f"{args.target}) -> {index}"
    )
    return 0


def evaluate(args: argparse.Namespace, restored) -> int:
    """Print the localisation tables (split with boxes) and part tables (split with parts) of one explain pass
    over a split; save them as JSON and write report.html."""
    options = args.options
    try:
        with tqdm(unit="image", desc=f"evaluate {args.split}", dynamic_ncols=True) as bar:
            done = explain.evaluate(
                restored,
                args.split,
                options=options,
                batch_size=args.batch_size,
                max_images=args.max_images,
                auc_steps=args.auc_steps,
                report_images=args.report_images,
                progress=bar.update,
            )
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    name = restored.config.dataset.name
    title = f" on {name} {args.split} (target {args.target})"
    located = done.localization
    if located["results"] is None:
        print(f"split {args.split!r} of {name} has no boxes: no localisation tables, only the part tables")
    else:
        print(localization.format_tables(located, title))
    for method, tables in (done.parts or {}).items():
        print(parts.format_tables(tables, f", {method}{title}", per_class=args.per_class))
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"localization_{args.split}.json")
    finer = {"finer_k": options.finer_k, "finer_alpha": options.finer_alpha} if options.target == "finer" else {}
    disagreeing = {
        m: [{"tag": r.item.tag, "origin": r.item.origin, "disagreement": score} for score, r in top]
        for m, top in done.disagreeing.items()
    }
    with open(path, "w") as f:
        json.dump(
            {
                "target": args.target,
                "concat": options.concat,
                **finer,
                **located,
                "parts": done.parts,
                "disagreeing": disagreeing,
            },
            f,
            indent=2,
        )
    print(f"saved {path}")
    if args.report_images and not done.disagreeing:
        print("(fewer than two block maps: report.html ranks no images by how much the blocks disagree)")
    for report in explain.write_report(done, restored, out_dir, title=f" (target {args.target})"):
        print(f"wrote {report}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    """Restore, check the output folder, then explain the images or evaluate the split; returns the exit status."""
    restored = common.restore(args, PROG)
    args.options = maps_for(args, methods.get(restored.config.method))
    args.out = args.out or os.path.join(restored.run, "explain")
    check_writable(args.out, "pass --out DIR")
    return evaluate(args, restored) if args.evaluate else explain_images(args, restored)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = parse_args(argv)
    common.quiet_logging()
    return common.status(PROG, lambda: _explain(args))


def run() -> None:
    """The console script: exit with main's status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
