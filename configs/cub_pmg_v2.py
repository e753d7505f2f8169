"""PMG-V2 on CUB-200-2011 with the official code's settings: ResNet50, resize 550, crop 448, batch 16 (plus 16
positives), 200 epochs, SGD lr 0.005 for the new layers and 0.0005 for the backbone, divided by 10 after epoch 100.

`--config configs/cub_pmg_v2.py` reads the folder extracted from CUB_200_2011.tgz;
`--config configs/cub_pmg_v2.py:tfds` reads TFDS caltech_birds2011 (array_record) instead.
docs/methods.md says what differs from PMG and where this departs from the official code.
"""

from pmg_jax import config


def get_config(source: str = "folder"):
    c = config.for_dataset("cub", source)
    c.method = "pmg_v2"
    c.optim.lr_new = 0.005
    c.optim.lr_backbone = 0.0005
    c.optim.schedule = "step"  # the method's default, stated: lr / 10 for the epochs after epoch 100 (0-based)
    c.optim.step_epochs = (100,)
    c.optim.step_factor = 0.1
    c.num_epochs = 200
    c.batch_size = 16
    return c
