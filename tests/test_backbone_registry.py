"""The backbone seam: a toy CNN registered here, and nowhere in pmg_jax, trains and explains like ResNet."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_demo_config

from pmg_jax import backbones, cam, explain, loop, optim
from pmg_jax import state as state_lib


class ToyCNN(nn.Module):
    """Three stages of stride-2 3x3 convolutions (flax's own layers): stride 8, widths w, 2w, 4w."""

    width: int
    stage_sizes: tuple[int, ...]
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        maps = []
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                x = nn.relu(
                    nn.Conv(
                        self.width * 2**i,
                        (3, 3),
                        strides=2 if j == 0 else 1,
                        dtype=self.dtype,
                        name=f"stage{i + 1}_{j}",
                    )(x)
                )
            maps.append(x)
        return tuple(maps)


TOY = backbones.Backbone(
    name="toy3",
    build=ToyCNN,
    width=8,
    stage_sizes=(1, 1, 1),
    channels=lambda width, sizes: tuple(width * 2**i for i in range(len(sizes))),
    stage_of=lambda path: int(path[0][len("stage")]),
    stride=8,
)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    backbones.register(TOY)
    workdir = str(tmp_path_factory.mktemp("toy_run"))
    config = tiny_demo_config(
        **{
            "model.backbone": "toy3",
            "model.width": 0,
            "model.stage_sizes": (),
            "model.feature_size": 16,
            "dataset.demo_image_size": 40,
            "data.resize_size": 40,
            "data.crop_size": 32,
            "batch_size": 8,
            "eval_batch_size": 16,
            "dataset.demo_train_size": 128,
            "dataset.demo_test_size": 32,
            "num_epochs": 3,
            "log_every_steps": 4,
            "bn_stats": "used",
        }
    )
    best = loop.train_and_evaluate(config, workdir)
    yield workdir, config, best
    del backbones.REGISTRY["toy3"]


@pytest.mark.slow
def test_a_backbone_registered_outside_the_package_trains(toy_run):
    workdir, config, best = toy_run
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [line for line in lines if line["kind"] == "train"]
    first, last = train[0], train[-1]
    assert last["loss_concat"] < first["loss_concat"], (first, last)
    assert best["epoch"] >= 1 and len([line for line in lines if line["kind"] == "eval"]) == config.num_epochs
    restored = state_lib.restore(workdir)
    params = restored.variables["params"]
    # the blocks sit on the toy's three stages, with its channels; its parameters form the backbone group
    assert params["conv_block1_0"]["conv"]["kernel"].shape[2] == 8
    assert params["conv_block3_0"]["conv"]["kernel"].shape[2] == 32
    groups = optim.param_groups(params)
    assert set(jax.tree.leaves(groups["features"])) == {"backbone"}
    assert set(jax.tree.leaves(groups["conv_block1_0"])) == {"new"}


@pytest.mark.slow
def test_a_backbone_registered_outside_the_package_explains(toy_run, tmp_path):
    workdir, config, _ = toy_run
    restored = state_lib.restore(workdir)
    _, items = explain.from_split(restored.config, "test", 3)
    results = explain.explain(
        restored, items, options=cam.CamOptions(maps=("block1", "block3", "concat", "layer2")), out_dir=str(tmp_path)
    )
    assert len(results) == 3
    for r in results:
        for name, m in r.maps["gradcam"].items():
            assert m.shape == (32, 32) and np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1, name
    assert os.path.isfile(tmp_path / "grid_test_00000.png") and os.path.isfile(tmp_path / "index.html")
