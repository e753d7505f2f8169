"""Grad-CAM of a trained PMG: python explain.py --ckpt runs/ --block 3 (see pmg_jax/cli/explain.py, --help)."""

import sys

from pmg_jax.cli.explain import main

if __name__ == "__main__":
    sys.exit(main())
