"""Stanford Cars (196 classes) with the reference settings: ResNet50, resize 550, crop 448, batch 16, 200 epochs.

`--config configs/cars.py` reads the extracted folder (devkit, cars_annos.mat or CSV layout);
`--config configs/cars.py:tfds` reads TFDS cars196 (array_record) instead.
"""

from configs import default


def get_config(source: str = "folder"):
    c = default.get_config()
    c.dataset.name = "cars"
    c.dataset.source = source
    c.dataset.data_dir = "data/stanford_cars" if source == "folder" else ""  # folder, or TFDS data_dir ('' = default)
    c.dataset.num_classes = 196
    c.data.workers = 8  # decoding 448-pixel crops for a GPU takes several cores
    return c
