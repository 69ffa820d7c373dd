"""The embedded ``synthetic`` dataset: fine-grained "constellation" objects drawn from a seed.

Each class is an object made of three coloured parts (disc, square, triangle, ring, bar, cross)
at fixed relative positions. Colours come from a small shared palette and part shapes from a
small shared set, so classes differ mainly in how the parts are arranged: colour statistics
alone (what a random network picks up) do not separate them, while the layout is learnable.
Every image of a class shows the same object under a random pose (rotation, scale, position),
colour jitter, a random background gradient, clutter shapes and pixel noise.

Classes ``0 .. num_classes/2 - 1`` are the train split, the rest the test split (class-disjoint,
as on the real benchmarks). Generation is deterministic in ``seed`` and takes a few seconds; the
images are packed once into the HDF5 cache and read from there afterwards.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from aomd.data.cache import PackedSplits, open_packed
from aomd.errors import ConfigError
from aomd.data.splits import RetrievalData

SHAPES = ("disc", "square", "triangle", "ring", "bar", "cross")
PALETTE = np.array(
    [
        [0.90, 0.20, 0.20],
        [0.20, 0.70, 0.25],
        [0.20, 0.35, 0.90],
        [0.95, 0.80, 0.15],
        [0.80, 0.30, 0.85],
        [0.15, 0.80, 0.85],
        [0.95, 0.55, 0.15],
        [0.92, 0.92, 0.92],
    ],
    dtype=np.float32,
)
PARTS_PER_OBJECT = 3
CLUTTER_PER_IMAGE = 4
FORMAT = "synthetic-v1"


def _shape_distance(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of a unit-radius shape centred at the origin."""
    if kind == "disc":
        return np.hypot(x, y) - 1.0
    if kind == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.85
    if kind == "triangle":
        # equilateral triangle pointing up: the max of three half-plane distances
        return np.maximum.reduce(
            [-y - 0.5, 0.866 * x + 0.5 * y - 0.5, -0.866 * x + 0.5 * y - 0.5]
        ) * 1.4
    if kind == "ring":
        return np.abs(np.hypot(x, y) - 0.75) - 0.25
    if kind == "bar":
        return np.maximum(np.abs(x) - 1.0, np.abs(y) - 0.35)
    if kind == "cross":
        arm_h = np.maximum(np.abs(x) - 1.0, np.abs(y) - 0.3)
        arm_v = np.maximum(np.abs(y) - 1.0, np.abs(x) - 0.3)
        return np.minimum(arm_h, arm_v)
    raise AssertionError(kind)


def _paint(canvas: np.ndarray, dist: np.ndarray, colour: np.ndarray, pixel: float) -> None:
    """Alpha-blend `colour` [n, 3] into `canvas` [n, S, S, 3] where `dist` [n, S, S] < 0 (anti-aliased)."""
    alpha = np.clip(0.5 - dist / pixel, 0.0, 1.0)[..., None]
    canvas *= 1.0 - alpha
    canvas += alpha * colour[:, None, None, :]


def _class_recipe(rng: np.random.Generator) -> list[tuple[str, int, float, float, float, float]]:
    """Parts of one object, each (shape, palette index, x, y, radius, orientation)."""
    angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.6, 0.6, 3)
    radii = rng.uniform(0.18, 0.42, PARTS_PER_OBJECT)
    parts = []
    for i in range(PARTS_PER_OBJECT):
        parts.append(
            (
                SHAPES[rng.integers(len(SHAPES))],
                int(rng.integers(len(PALETTE))),
                float(radii[i] * np.cos(angles[i])),
                float(radii[i] * np.sin(angles[i])),
                float(rng.uniform(0.12, 0.22)),
                float(rng.uniform(0, np.pi)),
            )
        )
    return parts


def render_class(recipe, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `count` images [count, size, size, 3] uint8 of the object described by `recipe`."""
    n = count
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    gx, gy = np.meshgrid(axis, axis, indexing="xy")
    gx, gy = gx[None], gy[None]
    pixel = 2.0 / size

    # background: a random two-colour vertical/horizontal gradient
    c0 = rng.uniform(0.0, 0.6, (n, 3)).astype(np.float32)
    c1 = rng.uniform(0.0, 0.6, (n, 3)).astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    t = (np.cos(direction)[:, None, None] * gx + np.sin(direction)[:, None, None] * gy + 1) / 2
    canvas = c0[:, None, None] * (1 - t[..., None]) + c1[:, None, None] * t[..., None]

    # clutter shapes behind the object
    for _ in range(CLUTTER_PER_IMAGE):
        kind = SHAPES[rng.integers(len(SHAPES))]
        cx, cy = rng.uniform(-1, 1, (2, n, 1, 1)).astype(np.float32)
        r = rng.uniform(0.06, 0.14, (n, 1, 1)).astype(np.float32)
        colour = PALETTE[rng.integers(len(PALETTE), size=n)] * rng.uniform(0.6, 1.0, (n, 1))
        _paint(canvas, _shape_distance(kind, (gx - cx) / r, (gy - cy) / r) * r, colour, pixel)

    # object pose: rotation, scale, translation
    theta = rng.uniform(-np.pi / 4, np.pi / 4, (n, 1, 1)).astype(np.float32)
    scale = rng.uniform(0.75, 1.15, (n, 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.18, 0.18, (2, n, 1, 1)).astype(np.float32)
    cos, sin = np.cos(theta), np.sin(theta)
    # object frame coordinates of every pixel
    ox = (cos * (gx - shift[0]) + sin * (gy - shift[1])) / scale
    oy = (-sin * (gx - shift[0]) + cos * (gy - shift[1])) / scale
    brightness = rng.uniform(0.75, 1.15, (n, 1)).astype(np.float32)
    for kind, colour_idx, px, py, radius, orientation in recipe:
        co, so = np.cos(orientation), np.sin(orientation)
        lx, ly = (co * (ox - px) + so * (oy - py)) / radius, (-so * (ox - px) + co * (oy - py)) / radius
        jitter = rng.normal(0, 0.05, (n, 3)).astype(np.float32)
        colour = np.clip(PALETTE[colour_idx][None] * brightness + jitter, 0, 1)
        _paint(canvas, _shape_distance(kind, lx, ly) * radius * scale, colour, pixel)

    canvas += rng.normal(0, 0.04, canvas.shape).astype(np.float32)
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)


def generate(num_classes: int, images_per_class: int, size: int, seed: int):
    """All images [num_classes * images_per_class, size, size, 3] uint8 and labels [N] int64."""
    class_rng = np.random.default_rng([seed, 0])
    recipes = [_class_recipe(class_rng) for _ in range(num_classes)]
    images = np.empty((num_classes * images_per_class, size, size, 3), dtype=np.uint8)
    for c, recipe in enumerate(recipes):
        rng = np.random.default_rng([seed, 1, c])
        images[c * images_per_class : (c + 1) * images_per_class] = render_class(
            recipe, images_per_class, size, rng
        )
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), images_per_class)
    return images, labels


def load_synthetic(
    num_classes: int = 100,
    images_per_class: int = 40,
    base_size: int = 72,
    image_size: int = 64,
    seed: int = 0,
    cache_dir: str | Path = "~/.cache/aomd",
    in_memory: bool = True,
) -> RetrievalData:
    """Generate (first use) or read the synthetic dataset, split class-disjoint in halves."""
    if num_classes < 2 or images_per_class < 2:
        raise ConfigError("dataset.num_classes and dataset.images_per_class must both be at least 2.")

    def build() -> PackedSplits:
        images, labels = generate(num_classes, images_per_class, base_size, seed)
        is_train = labels < num_classes // 2
        return {
            split: (images[mask], labels[mask], None)
            for split, mask in (("train", is_train), ("test", ~is_train))
        }

    key = {
        "format": FORMAT,
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "base_size": base_size,
        "seed": seed,
    }
    return open_packed(
        "synthetic", key, build, cache_dir=cache_dir, image_size=image_size, in_memory=in_memory
    )
