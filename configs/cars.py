"""Stanford Cars (196 classes) with the reference settings: ResNet50, resize 550, crop 448, batch 16, 200 epochs.

`--config configs/cars.py` reads the extracted folder (devkit, cars_annos.mat or CSV layout);
`--config configs/cars.py:tfds` reads TFDS cars196 (array_record) instead.
"""

from pmg_jax import config


def get_config(source: str = "folder"):
    return config.for_dataset("cars", source)
