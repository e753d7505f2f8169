"""Stanford Dogs (120 breeds) with the PMG reference settings: ResNet50, resize 550, crop 448, batch 16, 200 epochs.

`--config configs/dogs.py` reads the folder holding the extracted images.tar, annotation.tar
and lists.tar; `--config configs/dogs.py:tfds` reads TFDS stanford_dogs (array_record).
"""

from pmg_jax import config


def get_config(source: str = "folder"):
    return config.for_dataset("dogs", source)
