"""Jigsaw permutations: pure block permutations; the reference's single cycle; per-image option."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmg_jax import jigsaw


def block_ids(batch: int, n: int, block: int) -> jnp.ndarray:
    """Images whose every pixel holds the id of its block (and the image index in channel 1)."""
    ids = np.arange(n * n).reshape(n, n).repeat(block, 0).repeat(block, 1)
    img = np.stack([ids, np.zeros_like(ids), np.ones_like(ids)], -1).astype(np.float32)
    imgs = np.stack([img] * batch)
    imgs[..., 1] = np.arange(batch)[:, None, None]
    return jnp.asarray(imgs)


def observed_src(images: np.ndarray, n: int) -> np.ndarray:
    """For each output block, which input block it came from (checking each block is uniform)."""
    b, h, w, _ = images.shape
    blocks = images[..., 0].reshape(b, n, h // n, n, w // n).transpose(0, 1, 3, 2, 4).reshape(b, n * n, -1)
    assert (blocks == blocks[..., :1]).all(), "a block was not moved whole"
    return blocks[..., 0].astype(int)


def cycle_length_from_zero(src: np.ndarray) -> int:
    seen, i = 1, int(src[0])
    while i != 0:
        i, seen = int(src[i]), seen + 1
    return seen


@pytest.mark.parametrize("n", [2, 4, 8])
def test_cycle_is_a_single_cycle_with_no_fixed_block(n):
    for seed in range(20):
        src = np.asarray(jigsaw.sample_cycle(jax.random.PRNGKey(seed), n))
        assert sorted(src) == list(range(n * n))
        assert not (src == np.arange(n * n)).any()
        assert cycle_length_from_zero(src) == n * n


def test_n2_reaches_exactly_the_six_four_cycles():
    draws = {tuple(np.asarray(jigsaw.sample_cycle(k, 2))) for k in jax.random.split(jax.random.PRNGKey(0), 400)}
    four_cycles = {p for p in itertools.permutations(range(4)) if cycle_length_from_zero(np.array(p)) == 4}
    assert len(four_cycles) == 6
    assert draws == four_cycles


@pytest.mark.parametrize("mode", jigsaw.MODES)
def test_shuffle_moves_whole_blocks_as_src_says(mode):
    n, block, batch = 4, 3, 5
    images = block_ids(batch, n, block)
    src = jigsaw.sample(jax.random.PRNGKey(1), n, batch, mode)
    out = np.asarray(jax.jit(jigsaw.shuffle_blocks, static_argnums=1)(images, n, src))
    want = np.broadcast_to(np.asarray(src), (batch, n * n))
    np.testing.assert_array_equal(observed_src(out, n), want)
    np.testing.assert_array_equal(out[..., 1], np.asarray(images)[..., 1])  # images stay in their slot
    if mode == "cycle":
        assert (observed_src(out, n) == observed_src(out, n)[:1]).all()  # shared by the batch
    else:
        assert len({tuple(r) for r in observed_src(out, n)}) > 1  # drawn per image


def test_uniform_mode_covers_all_permutations_including_identity():
    draws = {tuple(r) for r in np.asarray(jigsaw.sample_uniform(jax.random.PRNGKey(0), 2, 2000))}
    assert len(draws) == 24


def test_bad_grid_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        jigsaw.shuffle_blocks(jnp.zeros((1, 10, 10, 3)), 4, jnp.arange(16))
    with pytest.raises(ValueError, match="jigsaw mode"):
        jigsaw.sample(jax.random.PRNGKey(0), 2, 1, "spiral")


_SAMPLE = jax.jit(jigsaw.sample, static_argnums=(1, 2, 3))
_SHUFFLE = jax.jit(jigsaw.shuffle_blocks, static_argnums=1)


@settings(max_examples=25, deadline=None)
@given(
    n=st.sampled_from([1, 2, 3, 4, 8]),
    block=st.integers(1, 5),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(jigsaw.MODES),
)
def test_shuffle_is_a_pixel_permutation_and_invertible(n, block, batch, seed, mode):
    # Each example is a new shape: one jitted program per call compiles once where the eager ops compile one by one.
    images = np.random.default_rng(seed).standard_normal((batch, n * block, n * block, 2)).astype(np.float32)
    src = _SAMPLE(jax.random.fold_in(jax.random.PRNGKey(seed), 1), n, batch, mode)
    out = np.asarray(_SHUFFLE(images, n, src))
    assert out.shape == images.shape
    np.testing.assert_array_equal(np.sort(out.ravel()), np.sort(images.ravel()))
    inverse = np.argsort(np.asarray(src), axis=-1)
    np.testing.assert_array_equal(np.asarray(_SHUFFLE(out, n, inverse)), images)
