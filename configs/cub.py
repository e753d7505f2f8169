"""CUB-200-2011 with the reference settings: ResNet50, resize 550, crop 448, batch 16, 200 epochs.

`--config configs/cub.py` reads the folder extracted from CUB_200_2011.tgz;
`--config configs/cub.py:tfds` reads TFDS caltech_birds2011 (array_record) instead.
"""

from configs import default


def get_config(source: str = "folder"):
    c = default.get_config()
    c.dataset.name = "cub"
    c.dataset.source = source
    c.dataset.data_dir = "data/CUB_200_2011" if source == "folder" else ""  # folder, or TFDS data_dir ('' = default)
    c.dataset.num_classes = 200
    c.data.workers = 8  # decoding 448-pixel crops for a GPU takes several cores
    return c
