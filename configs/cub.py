"""CUB-200-2011 with the reference settings: ResNet50, resize 550, crop 448, batch 16, 200 epochs.

`--config configs/cub.py` reads the folder extracted from CUB_200_2011.tgz;
`--config configs/cub.py:tfds` reads TFDS caltech_birds2011 (array_record) instead.
"""

# The paper's batch of 16 ran on 2 GPUs, each BatchNorm normalising the 8 images of its GPU:
# --config.model.bn_group_size=8 reproduces that (and --config.model.bn_group_stats=first keeps the
# first group's running statistics, as nn.DataParallel kept GPU 0's); the default, 0, normalises over
# all 16 (synchronised BatchNorm). docs/accelerators.md has this and the memory options.

from pmg_jax import config


def get_config(source: str = "folder"):
    return config.for_dataset("cub", source)
