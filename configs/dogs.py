"""Stanford Dogs (120 breeds) with the PMG reference settings: ResNet50, resize 550, crop 448, batch 16, 200 epochs.

`--config configs/dogs.py` reads the folder holding the extracted images.tar, annotation.tar
and lists.tar; `--config configs/dogs.py:tfds` reads TFDS stanford_dogs (array_record).
"""

from configs import default


def get_config(source: str = "folder"):
    c = default.get_config()
    c.dataset.name = "dogs"
    c.dataset.source = source
    c.dataset.data_dir = "data/stanford_dogs" if source == "folder" else ""  # folder, or TFDS data_dir ('' = default)
    c.dataset.num_classes = 120
    c.data.workers = 8  # decoding 448-pixel crops for a GPU takes several cores
    return c
