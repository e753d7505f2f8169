"""The learning rate of every optimizer update: the per-epoch cosine and step schedules, and the optional warm-up."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pmg_jax import config as config_lib
from pmg_jax import optim, validate
from pmg_jax.optim import make_optimizer

STEPS_PER_EPOCH, EPOCHS = 3, 5
UPDATES_PER_EPOCH = 4 * STEPS_PER_EPOCH  # four passes, four updates per iteration
LR_NEW, LR_BACKBONE = 0.3, 0.05


def learning_rates(warmup_epochs: int, **schedule) -> dict[str, list[float]]:
    """The rate each group got at every update: with no momentum or decay, a unit gradient moves a parameter by -lr."""
    tx = make_optimizer(
        **schedule,
        lr_new=LR_NEW,
        lr_backbone=LR_BACKBONE,
        num_epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        momentum=0.0,
        weight_decay=0.0,
        warmup_epochs=warmup_epochs,
    )
    params = {"features": {"w": jnp.zeros(2)}, "head1": {"w": jnp.zeros(2)}}
    grads = {"features": {"w": jnp.ones(2)}, "head1": {"w": jnp.ones(2)}}
    state, rates = tx.init(params), {"backbone": [], "new": []}
    for _ in range(EPOCHS * UPDATES_PER_EPOCH):
        updates, state = tx.update(grads, state, params)
        rates["backbone"].append(-float(updates["features"]["w"][0]))
        rates["new"].append(-float(updates["head1"]["w"][0]))
    return rates


def cosine(base: float, update: int) -> float:
    epoch = update // UPDATES_PER_EPOCH
    return base / 2 * (math.cos(math.pi * epoch / EPOCHS) + 1)


def test_without_warmup_the_rate_is_the_reference_cosine_of_the_epoch():
    rates = learning_rates(warmup_epochs=0)
    last = EPOCHS * UPDATES_PER_EPOCH - 1
    for update in (0, 5, UPDATES_PER_EPOCH - 1, UPDATES_PER_EPOCH, 2 * UPDATES_PER_EPOCH + 7, last):
        assert rates["new"][update] == pytest.approx(cosine(LR_NEW, update), rel=1e-5)
        assert rates["backbone"][update] == pytest.approx(cosine(LR_BACKBONE, update), rel=1e-5)


def test_warmup_rises_linearly_per_update_then_follows_the_cosine():
    warmup = 2 * UPDATES_PER_EPOCH
    rates = learning_rates(warmup_epochs=2)
    for update, fraction in (
        (0, 0.0),
        (1, 1 / warmup),
        (UPDATES_PER_EPOCH + 3, (UPDATES_PER_EPOCH + 3) / warmup),
        (warmup - 1, (warmup - 1) / warmup),
    ):
        assert rates["new"][update] == pytest.approx(LR_NEW * fraction, rel=1e-5, abs=1e-9)
        assert rates["backbone"][update] == pytest.approx(LR_BACKBONE * fraction, rel=1e-5, abs=1e-9)
    for update in (warmup, warmup + UPDATES_PER_EPOCH - 1, 3 * UPDATES_PER_EPOCH + 4, EPOCHS * UPDATES_PER_EPOCH - 1):
        assert rates["new"][update] == pytest.approx(cosine(LR_NEW, update), rel=1e-5)
        assert rates["backbone"][update] == pytest.approx(cosine(LR_BACKBONE, update), rel=1e-5)
    assert np.all(np.diff(rates["new"][:warmup]) > 0)


def test_a_negative_warmup_is_refused_naming_the_field():
    c: ml_collections.ConfigDict = config_lib.for_dataset("demo")
    c.optim.warmup_epochs = -1
    with pytest.raises(validate.ConfigError, match=r"config\.optim\.warmup_epochs=-1 must be >= 0"):
        validate.check(c, num_devices=1)


def stepped(base: float, update: int, step_epochs: tuple[int, ...], factor: float) -> float:
    epoch = update // UPDATES_PER_EPOCH
    return base * factor ** sum(epoch > b for b in step_epochs)


@pytest.mark.parametrize("warmup_epochs", [0, 1])
def test_the_step_schedule_divides_the_rate_after_each_step_epoch(warmup_epochs):
    rates = learning_rates(warmup_epochs, lr_schedule="step", step_epochs=(1, 3), step_factor=0.1)
    for update in range(warmup_epochs * UPDATES_PER_EPOCH, EPOCHS * UPDATES_PER_EPOCH):
        assert rates["new"][update] == pytest.approx(stepped(LR_NEW, update, (1, 3), 0.1), rel=1e-5)
        assert rates["backbone"][update] == pytest.approx(stepped(LR_BACKBONE, update, (1, 3), 0.1), rel=1e-5)
    assert rates["new"][2 * UPDATES_PER_EPOCH] == pytest.approx(LR_NEW / 10, rel=1e-5)  # epochs 2 and 3: one drop
    assert rates["new"][-1] == pytest.approx(LR_NEW / 100, rel=1e-5)


def test_step_epochs_100_is_the_official_condition_epoch_greater_than_100():
    """PMG-V2's train.py sets lr / 10 `if epoch > 100` (0-based): epoch 100 still trains at the base rate."""
    lr = optim.epoch_step(0.005, (100,), 0.1)
    assert [float(lr(e)) for e in (0, 99, 100)] == pytest.approx([0.005] * 3, rel=1e-6)
    assert [float(lr(e)) for e in (101, 150, 199)] == pytest.approx([0.0005] * 3, rel=1e-6)


def test_the_schedule_and_its_steps_are_checked_naming_the_field():
    c: ml_collections.ConfigDict = config_lib.for_dataset("demo")
    c.optim.schedule = "linear"
    with pytest.raises(validate.ConfigError, match=r"config\.optim\.schedule='linear' must be one of"):
        validate.check(c, num_devices=1)
    c.optim.schedule = "step"
    for bad in ((100, 50), (-1,), (1.5,)):
        c.optim.step_epochs = bad
        with pytest.raises(
            validate.ConfigError, match=r"config\.optim\.step_epochs=.* must be increasing whole epochs"
        ):
            validate.check(c, num_devices=1)
    c.optim.step_epochs, c.optim.step_factor = (3,), 0.0
    with pytest.raises(validate.ConfigError, match=r"config\.optim\.step_factor=0.0 must be > 0"):
        validate.check(c, num_devices=1)
    c.optim.step_factor = 0.1
    validate.check(c, num_devices=1)
    assert optim.lr_schedule(c) == "step"


def test_auto_takes_the_methods_schedule_and_counts_its_updates_per_epoch():
    """pmg_v2: the step schedule at its (100,) and three updates an iteration; pmg: the cosine."""
    c: ml_collections.ConfigDict = config_lib.for_dataset("demo")
    assert optim.lr_schedule(c) == "cosine"
    c.method, c.num_epochs = "pmg_v2", 200
    assert optim.lr_schedule(c) == "step"
    tx = optim.from_config(c, steps_per_epoch=1)
    params, grads = {"head1": {"w": jnp.zeros(1)}}, {"head1": {"w": jnp.ones(1)}}
    state, rates = tx.init(params), []
    for _ in range(3 * 102):  # three updates an iteration, one iteration an epoch: epochs 0 to 101
        updates, state = tx.update(grads, state, params)
        rates.append(-float(updates["head1"]["w"][0]))
    # no momentum cancels out here: compare the first update of epoch 100 with that of epoch 101 after momentum
    assert rates[3 * 100] == pytest.approx(rates[3 * 100 - 1], rel=1e-3)  # epoch 100: the base rate still
    assert rates[3 * 101] < 0.2 * rates[3 * 101 - 1]  # epoch 101: a tenth


def test_the_pmg_v2_configs_validate_with_the_official_schedule():
    from configs import cub_pmg_v2, demo_pmg_v2

    c = cub_pmg_v2.get_config()
    validate.check(c, num_devices=1)
    assert (c.method, optim.lr_schedule(c), tuple(c.optim.step_epochs), c.num_epochs) == ("pmg_v2", "step", (100,), 200)
    assert (c.optim.lr_new, c.optim.lr_backbone, c.batch_size, c.data.resize_size, c.data.crop_size) == (
        0.005,
        0.0005,
        16,
        550,
        448,
    )
    validate.check(demo_pmg_v2.get_config(), num_devices=1)
