"""CUB-200-2011 with the reference settings: ResNet50, resize 550, crop 448, batch 16, 200 epochs.

`--config configs/cub.py` reads the folder extracted from CUB_200_2011.tgz;
`--config configs/cub.py:tfds` reads TFDS caltech_birds2011 (array_record) instead.
"""

from pmg_jax import config


def get_config(source: str = "folder"):
    return config.for_dataset("cub", source)
