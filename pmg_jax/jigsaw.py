"""Jigsaw block shuffling (the multi-granularity inputs), jit-able.

A permutation is a `src` index array over the n*n blocks in row-major order:
output block i is input block src[i]. Shape (n*n,) shares it across the batch,
shape (B, n*n) gives every image its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("cycle", "uniform")


def sample_cycle(key: jax.Array, n: int) -> jax.Array:
    """The reference's permutation: one random single cycle through all n*n blocks.

    Draw a random order p1..pm of the positions 1..n*n-1; then out[p1] = in[0],
    out[p(k+1)] = in[pk] and out[0] = in[pm]. No block stays in place.
    """
    m = n * n
    cycle = jnp.concatenate([jnp.zeros((1,), jnp.int32), 1 + jax.random.permutation(key, m - 1).astype(jnp.int32)])
    # out[cycle[j+1]] = in[cycle[j]], wrapping round.
    return jnp.zeros((m,), jnp.int32).at[jnp.roll(cycle, -1)].set(cycle)


def sample_uniform(key: jax.Array, n: int, batch: int) -> jax.Array:
    """An independent uniformly random permutation per image, shape (batch, n*n)."""
    keys = jax.random.split(key, batch)
    return jax.vmap(lambda k: jax.random.permutation(k, n * n).astype(jnp.int32))(keys)


def sample(key: jax.Array, n: int, batch: int, mode: str = "cycle") -> jax.Array:
    """Permutation for one jigsaw call: 'cycle' (reference, shared by the batch) or 'uniform' (per image)."""
    if mode == "cycle":
        return sample_cycle(key, n)
    if mode == "uniform":
        return sample_uniform(key, n, batch)
    raise ValueError(f"jigsaw mode must be one of {MODES}, got {mode!r}")


def shuffle_blocks(images: jax.Array, n: int, src: jax.Array) -> jax.Array:
    """Rearrange the n x n grid of blocks of NHWC `images` so that block i comes from block src[i]."""
    b, h, w, c = images.shape
    if h % n or w % n:
        raise ValueError(f"image size {h}x{w} is not divisible by the jigsaw grid n={n}")
    bh, bw = h // n, w // n
    blocks = images.reshape(b, n, bh, n, bw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, n * n, bh, bw, c)
    if src.ndim == 1:
        blocks = jnp.take(blocks, src, axis=1)
    else:
        blocks = jnp.take_along_axis(blocks, src[:, :, None, None, None], axis=1)
    return blocks.reshape(b, n, n, bh, bw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def jigsaw(key: jax.Array, images: jax.Array, n: int, mode: str = "cycle") -> jax.Array:
    """Shuffle the n x n blocks of NHWC `images` with a freshly drawn permutation."""
    return shuffle_blocks(images, n, sample(key, n, images.shape[0], mode))
