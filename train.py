"""Train PMG: python train.py --config configs/cub.py [--workdir runs/cub] (see pmg_jax/cli/train.py, --help)."""

from pmg_jax.cli.train import main

if __name__ == "__main__":
    main()
