"""CUB-200-2011 with the reference settings: ResNet50, resize 550, crop 448, batch 16, 200 epochs."""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset.name = "cub"
    c.dataset.data_dir = "data/CUB_200_2011"  # the folder extracted from CUB_200_2011.tgz
    c.dataset.num_classes = 200
    return c
