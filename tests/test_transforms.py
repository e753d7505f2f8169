"""The reference transforms against an independent PIL + torch computation, and their box geometry.

The reference is torchvision's Compose on a PIL image: Resize((550, 550)) (PIL
bilinear, antialiased), RandomCrop(448, padding=8), RandomHorizontalFlip,
ToTensor, Normalize(0.5, 0.5). torchvision itself is not installed; its maths is
spelled out below with PIL and torch. Tolerances, in grey levels of the uint8
image (one level is 2/255 after normalising with std 0.5):
- backend 'pil': identical up to float rounding (1e-6).
- backend 'opencv', no side shrinking (CUB: ~500x375 -> 550): at most 1 level.
- backend 'opencv', a side shrinking (Cars, Aircraft): mean at most 1 level,
  max at most 32 (at sharp edges; PIL antialiases with a wider triangle filter).
  Measured on these images: mean 0.2-0.85, max 6-24.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pmg_jax.data import synthetic, transforms

MEAN = STD = (0.5, 0.5, 0.5)
LEVEL = 2.0 / 255.0  # one grey level after normalisation


def photo(height: int, width: int) -> np.ndarray:
    """A natural-looking test image (anti-aliased shapes, clutter, sensor noise) of the given size."""
    image = synthetic.make_example(synthetic.DemoSpec(image_size=1024), "test", 7)["image"]
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def torchvision_train(image: np.ndarray, params: transforms.CropParams, resize: int, crop: int, pad: int) -> np.ndarray:
    """Resize((r, r)) -> RandomCrop(crop, padding=pad) at params -> flip -> ToTensor -> Normalize, as HWC."""
    pil = Image.fromarray(image).resize((resize, resize), Image.BILINEAR)
    t = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    t = torch.nn.functional.pad(t, (pad, pad, pad, pad), value=0)
    t = t[:, params.top : params.top + crop, params.left : params.left + crop]
    if params.flip:
        t = t.flip(-1)
    x = (t.float() / 255.0 - 0.5) / 0.5
    return x.permute(1, 2, 0).numpy()


def torchvision_eval(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Resize((r, r)) -> CenterCrop(crop) -> ToTensor -> Normalize, as HWC."""
    pil = Image.fromarray(image).resize((resize, resize), Image.BILINEAR)
    top = int(round((resize - crop) / 2.0))
    pil = pil.crop((top, top, top + crop, top + crop))
    t = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    return ((t.float() / 255.0 - 0.5) / 0.5).permute(1, 2, 0).numpy()


def ours_train(image, rng_seed, backend, resize=550, crop=448, pad=8):
    """(our output, the crop parameters it drew)."""
    params = transforms.sample_crop(
        np.random.default_rng(rng_seed), resize_size=resize, crop_size=crop, pad=pad, hflip=True
    )
    out, _ = transforms.train_transform(
        image,
        np.random.default_rng(rng_seed),
        resize_size=resize,
        crop_size=crop,
        pad=pad,
        mean=MEAN,
        std=STD,
        backend=backend,
    )
    return out, params


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("size", [(375, 500), (500, 332), (820, 1200), (400, 700)])
def test_train_transform_with_pil_backend_is_the_reference(size, seed):
    image = photo(*size)
    out, params = ours_train(image, seed, "pil")
    np.testing.assert_allclose(out, torchvision_train(image, params, 550, 448, 8), atol=1e-6)


@pytest.mark.parametrize("size", [(375, 500), (500, 375), (550, 550), (120, 90)])
def test_opencv_matches_the_reference_within_one_level_when_upscaling(size):
    image = photo(*size)
    for seed in range(4):
        out, params = ours_train(image, seed, "opencv")
        assert np.abs(out - torchvision_train(image, params, 550, 448, 8)).max() <= LEVEL + 1e-6
    assert (
        np.abs(
            transforms.eval_transform(image, resize_size=550, crop_size=448, mean=MEAN, std=STD, backend="opencv")[0]
            - torchvision_eval(image, 550, 448)
        ).max()
        <= LEVEL + 1e-6
    )


@pytest.mark.parametrize("size", [(768, 1024), (1067, 1600), (400, 700), (700, 400), (580, 600)])
def test_opencv_matches_the_reference_within_stated_bounds_when_downscaling(size):
    image = photo(*size)
    out, params = ours_train(image, 5, "opencv")
    diff = np.abs(out - torchvision_train(image, params, 550, 448, 8)) / LEVEL
    assert diff.mean() <= 1.0 and diff.max() <= 32, (diff.mean(), diff.max())
    diff = (
        np.abs(
            transforms.eval_transform(image, resize_size=550, crop_size=448, mean=MEAN, std=STD, backend="opencv")[0]
            - torchvision_eval(image, 550, 448)
        )
        / LEVEL
    )
    assert diff.mean() <= 1.0 and diff.max() <= 32, (diff.mean(), diff.max())


def test_eval_transform_with_pil_backend_is_the_reference():
    image = photo(333, 500)
    out, _ = transforms.eval_transform(image, resize_size=550, crop_size=448, mean=MEAN, std=STD, backend="pil")
    np.testing.assert_allclose(out, torchvision_eval(image, 550, 448), atol=1e-6)


def test_zero_padding_becomes_minus_one_and_crops_reach_every_offset():
    image = np.full((60, 60, 3), 255, np.uint8)
    out = transforms.train_crop(image, transforms.CropParams(0, 0, False), resize_size=60, crop_size=48, pad=8)
    assert (out[:8] == 0).all() and (out[:, :8] == 0).all() and (out[8:, 8:] == 255).all()
    assert transforms.normalize(out, MEAN, STD)[0, 0, 0] == -1.0
    draws = [
        transforms.sample_crop(np.random.default_rng(s), resize_size=60, crop_size=48, pad=8, hflip=True)
        for s in range(1000)
    ]
    assert {p.top for p in draws} == {p.left for p in draws} == set(range(29))
    assert 0.4 < np.mean([p.flip for p in draws]) < 0.6


def test_position_crops_cover_every_offset_evenly_and_depend_on_seed_and_position():
    kw = dict(resize_size=60, crop_size=48, pad=8, hflip=True)
    draws = [transforms.position_crop(3, p, **kw) for p in range(5800)]
    tops, lefts = np.bincount([d.top for d in draws]), np.bincount([d.left for d in draws])
    assert len(tops) == len(lefts) == 29 and tops.min() > 100 and lefts.min() > 100  # 200 expected per offset
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.03
    assert np.corrcoef([d.top for d in draws], [d.left for d in draws])[0, 1] ** 2 < 0.01
    assert draws == [transforms.position_crop(3, p, **kw) for p in range(5800)]
    other = [transforms.position_crop(4, p, **kw) for p in range(200)]
    assert sum(a == b for a, b in zip(draws, other)) < 10  # 200 / 29**2 / 2 expected by chance
    assert not any(transforms.position_crop(3, p, **{**kw, "hflip": False}).flip for p in range(100))


def test_unknown_resize_backend_is_refused():
    with pytest.raises(ValueError, match="resize backend"):
        transforms.resize(np.zeros((4, 4, 3), np.uint8), 8, "cv3")


sizes = st.integers(1, 96)


@st.composite
def image_and_box(draw):
    """An image with a white rectangle on black, and that rectangle's pixel box."""
    h, w = draw(sizes), draw(sizes)
    x0, x1 = sorted(draw(st.lists(st.integers(0, w), min_size=2, max_size=2)))
    y0, y1 = sorted(draw(st.lists(st.integers(0, h), min_size=2, max_size=2)))
    image = np.zeros((h, w, 3), np.uint8)
    image[y0:y1, x0:x1] = 255
    return image, np.array([x0, y0, x1, y1], np.float32)


@st.composite
def geometry(draw):
    crop = draw(st.integers(4, 64))
    pad = draw(st.integers(0, 8))
    resize = draw(st.integers(max(1, crop - 2 * pad), crop + 40))
    return resize, crop, pad


@settings(max_examples=150, deadline=None)
@given(image_and_box(), geometry(), st.integers(0, 2**32 - 1))
def test_train_box_stays_inside_the_crop(data, geom, seed):
    image, box = data
    resize, crop, pad = geom
    out, out_box = transforms.train_transform(
        image, np.random.default_rng(seed), resize_size=resize, crop_size=crop, pad=pad, mean=MEAN, std=STD, box=box
    )
    assert out.shape == (crop, crop, 3) and out.dtype == np.float32
    assert np.all(out_box >= 0) and np.all(out_box <= crop)
    assert out_box[0] <= out_box[2] and out_box[1] <= out_box[3]


@settings(max_examples=150, deadline=None)
@given(image_and_box(), geometry(), st.integers(0, 2**32 - 1))
def test_train_box_follows_the_pixels(data, geom, seed):
    """The box of the bright pixels after the transform is the transformed box, within the blur of one pixel."""
    image, box = data
    resize, crop, pad = geom
    h, w = image.shape[:2]
    params = transforms.sample_crop(
        np.random.default_rng(seed), resize_size=resize, crop_size=crop, pad=pad, hflip=True
    )
    out = transforms.train_crop(image, params, resize_size=resize, crop_size=crop, pad=pad)
    expected = transforms.crop_box(
        transforms.scale_box(box, h, w, resize), params.top - pad, params.left - pad, crop, params.flip
    )
    tol = 1.0 + max(resize / w, resize / h, 1.0)  # bilinear spreads an edge over one source pixel
    if min(expected[2] - expected[0], expected[3] - expected[1]) > 2 * tol:
        ys, xs = np.nonzero(out[..., 0] >= 128)
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        np.testing.assert_allclose(found, expected, atol=tol)


@settings(max_examples=100, deadline=None)
@given(image_and_box(), geometry(), st.integers(0, 2**32 - 1))
def test_flip_is_an_involution(data, geom, seed):
    image, box = data
    resize, crop, pad = geom
    params = transforms.sample_crop(
        np.random.default_rng(seed), resize_size=resize, crop_size=crop, pad=pad, hflip=True
    )
    kw = dict(resize_size=resize, crop_size=crop, pad=pad)
    flipped = transforms.train_crop(image, transforms.CropParams(params.top, params.left, True), **kw)
    plain = transforms.train_crop(image, transforms.CropParams(params.top, params.left, False), **kw)
    np.testing.assert_array_equal(flipped[:, ::-1], plain)
    inside = transforms.crop_box(box, 0, 0, crop)
    twice = transforms.crop_box(transforms.crop_box(inside, 0, 0, crop, True), 0, 0, crop, True)
    np.testing.assert_allclose(twice, inside, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(image_and_box(), geometry())
def test_eval_box_and_normalisation_round_trip(data, geom):
    image, box = data
    resize, crop, _ = geom
    if crop > resize:
        return
    out, out_box = transforms.eval_transform(
        image, resize_size=resize, crop_size=crop, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), box=box
    )
    h, w = image.shape[:2]
    off = transforms.center_offset(resize, crop)
    expected = np.clip(transforms.scale_box(box, h, w, resize) - off, 0, crop)
    np.testing.assert_allclose(out_box, expected, atol=1e-4)
    restored = (out * np.float32([0.2, 0.25, 0.3]) + np.float32([0.4, 0.5, 0.6])) * 255.0
    pixels = transforms.resize(image, resize)[off : off + crop, off : off + crop]
    np.testing.assert_allclose(restored, pixels, atol=1e-3)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.integers(1, 48),
    st.integers(0, 10),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_crop_without_padding_equals_cropping_the_padded_image(h, w, crop, pad, seed, flip):
    """place_crop never builds the padded image; it must give exactly what padding, slicing and mirroring give."""
    image = np.random.default_rng(seed).integers(1, 256, (h, w, 3), dtype=np.uint8)  # no zeros: padding shows
    padded = np.zeros((h + 2 * pad + 2 * crop, w + 2 * pad + 2 * crop, 3), np.uint8)
    padded[pad + crop : pad + crop + h, pad + crop : pad + crop + w] = image
    rng = np.random.default_rng(seed + 1)
    # every corner from "entirely above/left of the image" to "entirely below/right of it"
    top, left = int(rng.integers(-crop - pad, h + pad + 1)), int(rng.integers(-crop - pad, w + pad + 1))
    want = padded[top + pad + crop : top + pad + 2 * crop, left + pad + crop : left + pad + 2 * crop]
    want = want[:, ::-1] if flip else want
    out = np.full((crop, crop, 3), 7, np.uint8)  # stale contents must be overwritten
    got = transforms.place_crop(image, top, left, crop, flip, out)
    assert got is out
    np.testing.assert_array_equal(got, want)


# Real photographs that scikit-image ships: each shrinks on at least one side on the way to 448 (the
# resize the CAM input makes) and grows or shrinks on the way to 550 (the train/eval resize).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def real_photo(name: str) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])


@pytest.mark.parametrize("name", PHOTOS)
def test_default_transforms_equal_the_reference_within_two_levels_on_real_photos(name):
    """torchvision's Resize on a PIL image is PIL's resize(BILINEAR) (torchvision's _functional_pil.resize);
    the default backend must be within 2 grey levels of it for every transform: train, eval, the CAM input."""
    image = real_photo(name)
    for seed in range(2):
        out, params = ours_train(image, seed, "auto")
        assert np.abs(out - torchvision_train(image, params, 550, 448, 8)).max() <= 2 * LEVEL + 1e-6
    out, _ = transforms.eval_transform(image, resize_size=550, crop_size=448, mean=MEAN, std=STD)
    assert np.abs(out - torchvision_eval(image, 550, 448)).max() <= 2 * LEVEL + 1e-6
    cam_input = transforms.resize(image, 448).astype(np.int16)
    reference = np.asarray(Image.fromarray(image).resize((448, 448), Image.BILINEAR), np.int16)
    assert np.abs(cam_input - reference).max() <= 2
