"""Random-access data sources selected by `config.dataset.name`.

Every source has `len`, `__getitem__` returning {'image': RGB uint8 HxWx3,
'label': int, optional 'box': [x0, y0, x1, y1]} and a `class_names` list.
"""

from __future__ import annotations

import ml_collections

from pmg_jax.data import synthetic


def make_source(config: ml_collections.ConfigDict, split: str):
    """The source of `split` ('train' or 'test') for the configured dataset."""
    d = config.dataset
    if d.name == "demo":
        spec = synthetic.DemoSpec(num_classes=d.num_classes, image_size=d.demo_image_size, seed=d.demo_seed)
        size = d.demo_train_size if split == "train" else d.demo_test_size
        return synthetic.DemoSource(spec, split, size)
    raise ValueError(f"config.dataset.name={d.name!r} is not a known dataset (known: 'demo')")
