"""Positive pairs (PMG-V2): each training example comes with another image of its class, a different file.

Which one is drawn from (seed, global position) alone (`transforms.position_hash`, its own stream), like
the example's crop, so the pairs depend only on the seed and the step: any worker count, host layout or
restart (kill -9 included) gives the same. The candidates are the class's other images in source order,
read cyclically from the drawn one; an unreadable candidate (corrupt, or over the pixel cap) is passed
over for the next, and when none of them can be read the example is paired with itself (its own image,
cropped independently) rather than with another class.

A class with exactly one training image has no positive at all: `Pairing.of` refuses it, naming the class
and the file (the official code fails on it too, with an empty batch of positives). Pairing an image with
itself would train the consistency loss on two crops of one photograph, silently another objective.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pmg_jax.data import decode, sources, transforms


@dataclasses.dataclass(frozen=True)
class Pairing:
    """The classes of a source's examples: `members[starts[c]:starts[c + 1]]` are class c's indices, sorted."""

    labels: np.ndarray
    members: np.ndarray
    starts: np.ndarray

    @classmethod
    def of(cls, source: Any) -> Pairing:
        """The pairing of a training source (a pipeline.Source); DatasetError naming a class with one image."""
        labels = sources.source_labels(source)
        counts = np.bincount(labels, minlength=len(source.class_names))
        single = np.flatnonzero(counts == 1)
        if len(single):
            c = int(single[0])
            only = int(np.flatnonzero(labels == c)[0])
            raise sources.DatasetError(
                f"pmg_v2 pairs each training image with another of its class, but class {c} "
                f"({source.class_names[c]!r}) has one training image ({decode.record_name(source[only])}); "
                f"{len(single)} class(es) have one: add images to them or leave them out of the training split"
            )
        return cls(labels, np.argsort(labels, kind="stable"), np.concatenate([[0], np.cumsum(counts)]))

    def others(self, index: int) -> np.ndarray:
        """The indices of the other images of `index`'s class, in source order."""
        c = int(self.labels[index])
        group = self.members[self.starts[c] : self.starts[c + 1]]
        return group[group != index]

    def first(self, index: int, seed: int, position: int) -> int:
        """Where the candidates of example `index` at global `position` start: a rank among its class's others."""
        return transforms.position_hash(seed, position, transforms.POSITIVE_DRAW_STREAM) % len(self.others(index))

    def candidates(self, index: int, first: int) -> np.ndarray:
        """The positives of `index` in the order they are tried: the class's others, cyclically from `first`."""
        return np.roll(self.others(index), -first)

    def pick(self, source: Any, index: int, first: int, max_pixels: int) -> tuple[dict | None, int]:
        """(decoded positive or None when no other image of the class can be read, candidates passed over)."""
        tried = self.candidates(index, first)
        for skipped, candidate in enumerate(tried):
            try:
                return decode.load_example(source[int(candidate)], max_pixels), skipped
            except decode.UnreadableImage:
                continue
        return None, len(tried)
