"""Regenerate docs/images/explain_demo_grid.png from a demo run (default runs/demo, as the README's Quick start
trains it): Grad-CAM of blocks 1-3 and concat for the first test examples, their grids stacked.

    python train.py --config configs/demo.py && python docs/make_demo_figure.py
"""

import argparse
import os
import tempfile

import numpy as np
from PIL import Image

from pmg_jax import explain, state


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="the demo run to explain")
    parser.add_argument("--images", type=int, default=4, help="test examples, one row each")
    parser.add_argument("--out", default=os.path.join(here, "images", "explain_demo_grid.png"))
    args = parser.parse_args()
    restored = state.restore(args.run)
    _, items = explain.from_split(restored.config, "test", restored.config.dataset.demo_test_size)
    chosen = [item for _, item in zip(range(args.images), items)]
    with tempfile.TemporaryDirectory() as folder:
        results = explain.explain(restored, chosen, out_dir=folder)
        rows = [np.asarray(Image.open(r.grids["gradcam"]).convert("RGB")) for r in results]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(rows)).save(args.out, optimize=True)
    print(f"wrote {args.out} from {restored.describe()}")


if __name__ == "__main__":
    main()
