"""Pictures of CAMs: the seed's JET overlays and file names, titled grids, and an index.html gallery."""

from __future__ import annotations

import glob
import html
import json
import os
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

TILE_HEIGHT = 224
MAX_SIDE = 2048  # overlays are drawn on the image shrunk to at most this longest side, whatever its size
GRID_PREFIX = "grid_"
CAPTION_KEY = "pmg_jax caption"  # PNG text chunk of a grid: its gallery caption lines, as JSON
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.6  # Hershey simplex at 0.6: capitals 12 px tall at the saved size (never smaller: long text wraps)
_LINE_HEIGHT = 24


def write_image(path: str, image: np.ndarray) -> None:
    """Write an RGB uint8 image; the format follows the extension (.jpg, .png, ...)."""
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def map_label(name: str) -> str:
    """The seed's name of a map: conv_block{k}, conv_block_concat; backbone maps keep theirs (layer{k})."""
    if name.startswith("block"):
        return f"conv_{name}"
    return "conv_block_concat" if name == "concat" else name


def map_file_stem(name: str, tag: str) -> str:
    """The seed's file names: conv_block{k}_<tag>, conv_block_concat_<tag> (and layer{k}_<tag>)."""
    return f"{map_label(name)}_{tag}"


def bounded(image: np.ndarray, side: int = MAX_SIDE) -> np.ndarray:
    """`image` shrunk (area-averaged, aspect kept) so that its longest side is at most `side`; as it is if so."""
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The seed's picture: JET colour map of `cam` (in [0, 1]) resized to the image, 0.3 x heatmap + 0.5 x image."""
    h, w = image.shape[:2]
    cam = cv2.resize(np.asarray(cam, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.uint8(255 * np.clip(cam, 0.0, 1.0)), cv2.COLORMAP_JET)
    blend = 0.3 * cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32) + 0.5 * image.astype(np.float32)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def _width(text: str) -> int:
    """Pixels `text` spans in the figures' font."""
    return cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)[0][0]


def wrap(text: str, width: int) -> list[str]:
    """`text` as lines that each fit `width` pixels, broken between words and inside a word too long for a line."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if _width(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:  # the word starts a line; what does not fit goes on to the next
            if line and _width(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    return [*lines, line]


def titled(tile: np.ndarray, lines: Sequence[str], rows: int = 0) -> np.ndarray:
    """`tile` under a white band of at least `rows` text lines holding `lines`, each wrapped to the tile's width."""
    w = tile.shape[1]
    wrapped = [part for line in lines for part in wrap(line, w - 8)]
    band = np.full((_LINE_HEIGHT * max(rows, len(wrapped)) + 6, w, 3), 255, np.uint8)
    for i, text in enumerate(wrapped):
        cv2.putText(band, text, (4, _LINE_HEIGHT * (i + 1) - 6), _FONT, _FONT_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, tile], axis=0)


def grid(tiles: Sequence[tuple[np.ndarray, Sequence[str]]], height: int = TILE_HEIGHT, gap: int = 4) -> np.ndarray:
    """One row of RGB images, each scaled to `height` (aspect kept) and titled with its lines."""
    scaled = []
    for image, lines in tiles:
        w = max(1, round(image.shape[1] * height / image.shape[0]))
        shrink = image.shape[0] > height
        scaled.append(
            (cv2.resize(image, (w, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR), lines)
        )
    rows = max(sum(len(wrap(line, image.shape[1] - 8)) for line in lines) for image, lines in scaled)
    row = []
    for image, lines in scaled:
        row.append(titled(image, lines, rows))
        row.append(np.full((row[-1].shape[0], gap, 3), 255, np.uint8))
    return np.concatenate(row[:-1], axis=1)


def save_explanation(
    out_dir: str,
    tag: str,
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    titles: dict[str, Sequence[str]],
    save_npy: bool = False,
    caption: Sequence[str] = (),
) -> str:
    """Write the seed-named overlays (.jpg, and .npy maps if asked) and a grid PNG; return the grid's file name.

    `image` is the original RGB image, drawn on shrunk to at most MAX_SIDE pixels a side (`bounded`), so that
    memory and files stay small whatever its size; `maps` are in [0, 1] at the network's input size;
    `titles` holds the grid title lines of the original ('input') and of every map; `caption`, the
    gallery's lines for the grid, is stored in the PNG itself (a text chunk) for `rebuild_index`.
    """
    image = bounded(image)
    tiles = [(image, titles["input"])]
    for name, m in maps.items():
        stem = os.path.join(out_dir, map_file_stem(name, tag))
        picture = overlay(image, m)
        write_image(stem + ".jpg", picture)
        if save_npy:
            np.save(stem + ".npy", np.asarray(m, np.float32))
        tiles.append((picture, titles[name]))
    grid_name = f"{GRID_PREFIX}{tag}.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(CAPTION_KEY, json.dumps(list(caption)))
    Image.fromarray(grid(tiles)).save(os.path.join(out_dir, grid_name), pnginfo=info)
    return grid_name


def rebuild_index(folder: str, title: str) -> str:
    """index.html listing every grid in `folder` (oldest first), each with the caption stored in it."""
    grids = sorted(glob.glob(os.path.join(folder, f"{GRID_PREFIX}*.png")), key=lambda p: (os.path.getmtime(p), p))
    entries = []
    for path in grids:
        with Image.open(path) as picture:
            lines = json.loads(picture.info.get(CAPTION_KEY, "[]")) or [os.path.basename(path)]
        entries.append((os.path.basename(path), lines))
    index = os.path.join(folder, "index.html")
    write_index(index, entries, title)
    return index


def write_index(path: str, entries: Sequence[tuple[str, Sequence[str]]], title: str) -> None:
    """An HTML gallery: one figure per (image file relative to `path`, caption lines)."""
    figures = "\n".join(
        f'<figure><a href="{html.escape(src)}"><img src="{html.escape(src)}" loading="lazy"></a>'
        f"<figcaption>{'<br>'.join(html.escape(line) for line in caption)}</figcaption></figure>"
        for src, caption in entries
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{margin:0 0 1.5em 0}}
img{{max-width:100%;border:1px solid #ccc}} figcaption{{font-size:0.9em;color:#333}}</style></head>
<body><h1>{html.escape(title)}</h1>
{figures}
</body></html>
""")
