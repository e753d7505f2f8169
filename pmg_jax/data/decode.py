"""Decoding source records into RGB pixels, in the input workers.

Sources hand out cheap records: the image as a file path, encoded bytes or an
in-memory array, a label, and optionally a box in pixels ('box') or in
fractions of the image size ('rel_box', as TFDS stores it), and optionally part
points ('parts', (P, 3) [x, y, visible] in pixels). `load_example` turns one into
{'image': RGB uint8 HxWx3, 'label', 'box', 'parts'}. Greyscale, CMYK,
16-bit and alpha images are converted (alpha is dropped); a file that yields no
pixels raises `UnreadableImage`, which the pipeline turns into a skip.

Every file is untrusted: its width and height are read from its header (by PIL's
format plugins, which decode no pixel) and an image of more than `max_pixels`
pixels is refused before OpenCV allocates anything, so memory stays bounded
whatever the header claims. What OpenCV itself refuses (cv2.error) is unreadable too.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping

import cv2
import numpy as np
from PIL import Image

from pmg_jax.errors import PMGError

# The default cap: the size at which PIL itself refuses an image as a decompression bomb
# (2 x Image.MAX_IMAGE_PIXELS, about 179 megapixels), so 100-megapixel photos still work.
DEFAULT_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# OpenCV refuses larger images whatever the cap (its OPENCV_IO_MAX_IMAGE_PIXELS, read when it loads).
OPENCV_MAX_PIXELS = 1 << 30
# How PIL's plugins fail on a header that is not theirs (as Image.open catches them).
_NOT_THIS_FORMAT = (SyntaxError, IndexError, TypeError, ValueError, EOFError, OSError, struct.error)

# PIL, and so the reference's torchvision loader, ignores EXIF orientation; the
# datasets' boxes refer to the stored pixel grid, so OpenCV must ignore it too.
# OpenCV >= 4.10 can have the decoder write RGB directly, which saves a conversion pass.
_DECODES_RGB = hasattr(cv2, "IMREAD_COLOR_RGB")
_IMREAD = (cv2.IMREAD_COLOR_RGB if _DECODES_RGB else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION


class UnreadableImage(PMGError, ValueError):
    """An image that cannot be decoded into pixels (corrupt, truncated, empty or not an image)."""


def _truncated_jpeg(data: bytes) -> bool:
    """True for a JPEG whose last scan has no end-of-image marker after it.

    Some OpenCV builds decode such files without error and fill the missing
    rows with grey. Inside entropy-coded data 0xFF is always stuffed, so the
    last start-of-scan marker is real and the end marker must follow it.
    """
    if not data.startswith(b"\xff\xd8") or data.endswith(b"\xff\xd9"):
        return False
    return data.find(b"\xff\xd9", data.rfind(b"\xff\xda")) < 0


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the header states them, read by PIL's format plugins without decoding a pixel.

    The plugins are called directly rather than through `Image.open`, whose own bomb check would refuse
    (or warn about) a size before the configured cap is applied. None when no plugin reads the format.
    """
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        accepted = True if accept is None else accept(prefix)
        if not accepted or isinstance(accepted, str):  # a str is PIL's reason for not accepting it
            continue
        try:
            with factory(io.BytesIO(data), "") as image:
                return image.size
        except _NOT_THIS_FORMAT:
            continue
    return None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    """UnreadableImage when a width x height image has more pixels than the cap allows."""
    if width * height > max_pixels:
        raise UnreadableImage(
            f"{width}x{height} pixels is more than the {max_pixels} pixels allowed (config.data.max_image_pixels, "
            f"--max-pixels)"
        )


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (any format OpenCV reads) -> RGB uint8 HxWx3, refusing more than `max_pixels`."""
    if not data:
        raise UnreadableImage("empty file")
    if _truncated_jpeg(data):
        raise UnreadableImage("truncated JPEG (no end-of-image marker)")
    size = header_size(data)
    if size is not None:
        _check_pixels(*size, max_pixels)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD)
    except cv2.error as e:
        reason = (e.err or str(e)).strip().splitlines() or ["cv2.error"]
        raise UnreadableImage(f"OpenCV cannot decode it ({reason[0]})") from None
    if image is None:
        raise UnreadableImage("corrupt or not an image OpenCV can decode")
    _check_pixels(image.shape[1], image.shape[0], max_pixels)  # a format PIL does not read, or a lying header
    return image if _DECODES_RGB else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An in-memory uint8 image, HxW or HxWx{1,3,4}, as RGB HxWx3 (alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        raise UnreadableImage(f"array of shape {image.shape} and dtype {image.dtype} is not a uint8 image")
    if image.ndim == 2:
        image = image[..., None]
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels in (3, 4):
        return image[..., :3]
    raise UnreadableImage(f"image with {channels} channels")


def read_file(path: str) -> bytes:
    """The bytes of an image file; UnreadableImage saying why when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UnreadableImage(f"cannot read: {e.strerror}") from e


def read_image(image: str | bytes | np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A record's image (file path, encoded bytes or array) -> RGB uint8 HxWx3 (files of at most `max_pixels`)."""
    if isinstance(image, str):
        image = read_file(image)
    if isinstance(image, (bytes, np.bytes_)):
        return decode_image(bytes(image), max_pixels)
    return as_rgb(image)


def record_name(record: Mapping) -> str:
    """How messages name a record: its 'name', else its path, else its label."""
    if "name" in record:
        return str(record["name"])
    if isinstance(record["image"], str):
        return record["image"]
    return f"in-memory image of label {record['label']}"


def load_example(record: Mapping, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """A source record -> {'image': RGB uint8 HxWx3, 'label': int, 'box': float32 pixel box or None,
    'parts': float32 (P, 3) [x, y, visible] or None}.

    Raises UnreadableImage naming the record when its image has no pixels or more than `max_pixels`.
    """
    try:
        image = read_image(record["image"], max_pixels)
    except UnreadableImage as e:
        raise UnreadableImage(f"{record_name(record)}: {e}") from e
    box = record.get("box")
    if record.get("rel_box") is not None:
        h, w = image.shape[:2]
        box = np.asarray(record["rel_box"], np.float32) * np.array([w, h, w, h], np.float32)
    return {
        "image": image,
        "label": int(record["label"]),
        "box": None if box is None else np.asarray(box, np.float32),
        "parts": None if record.get("parts") is None else np.asarray(record["parts"], np.float32).reshape(-1, 3),
    }
