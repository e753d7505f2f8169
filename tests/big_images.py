"""Large test images written without holding their pixels: grey PNGs built chunk by chunk, a noisy JPEG."""

import struct
import zlib

import cv2
import numpy as np


def _chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC-32 of type and payload."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_grey_png(path: str, width: int, height: int) -> None:
    """A valid width x height 8-bit grey PNG of zeros, compressed row by row (a 40000 x 40000 one is ~1.6 MB)."""
    compressor = zlib.compressobj(1)
    rows = 64
    block = bytes((width + 1) * rows)  # each row: filter byte 0, then its zeros
    data = [compressor.compress(block) for _ in range(height // rows)]
    data += [compressor.compress(bytes((width + 1) * (height % rows))), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(data)) + _chunk(b"IEND", b""))


def write_noise_jpeg(path: str, width: int, height: int, seed: int = 0) -> None:
    """A width x height colour JPEG: a horizontal gradient plus a tiled patch of noise."""
    rng = np.random.default_rng(seed)
    tile = rng.integers(0, 64, (256, 256, 3), dtype=np.uint8)
    ramp = np.linspace(0, 191, width).astype(np.uint8)
    image = np.tile(tile, (-(-height // 256), -(-width // 256), 1))[:height, :width]
    image += ramp[None, :, None]
    if not cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"could not write {path}")
