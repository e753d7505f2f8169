"""FGVC-Aircraft (100 variants) with the reference settings: ResNet50, resize 550, crop 448, batch 16, 200 epochs.

Trains on trainval (6667 images) and tests on test (3333), as the paper does.
"""

from pmg_jax import config


def get_config():
    return config.for_dataset("aircraft")
