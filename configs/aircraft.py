"""FGVC-Aircraft (100 variants) with the reference settings: ResNet50, resize 550, crop 448, batch 16, 200 epochs.

Trains on trainval (6667 images) and tests on test (3333), as the paper does.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset.name = "aircraft"
    c.dataset.source = "folder"  # TFDS has no FGVC-Aircraft builder
    c.dataset.data_dir = "data/fgvc-aircraft-2013b"  # the folder extracted from fgvc-aircraft-2013b.tar.gz
    c.dataset.num_classes = 100
    c.dataset.train_split = "trainval"
    c.data.workers = 8  # decoding 448-pixel crops for a GPU takes several cores
    return c
