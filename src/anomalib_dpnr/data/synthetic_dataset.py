"""A small generated dataset in MVTec AD layout: procedural textures with painted defects and masks.

Used by the demo when ``../shared/data`` is absent and by the tests, so nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

__all__ = ["make_synthetic_dataset"]

DEFECTS = ("scratch", "spot")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A woven-looking normal texture: crossed sinusoids with random phase, mild grain, fixed palette."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = 8.0
    weave = 0.5 + 0.25 * np.sin(2 * np.pi * period * x + rng.uniform(0, 2 * np.pi)) * np.sin(
        2 * np.pi * period * y + rng.uniform(0, 2 * np.pi)
    )
    grain = cv2.GaussianBlur(rng.normal(0, 0.04, (size, size)).astype(np.float32), (0, 0), 1.0)
    base = np.clip(weave + grain, 0, 1)
    palette = np.array([0.45, 0.6, 0.75], dtype=np.float32)  # BGR tint
    return np.clip(base[..., None] * palette * 1.3, 0, 1)


def _paint_defect(rng: np.random.Generator, image: np.ndarray, kind: str) -> np.ndarray:
    """Paint one defect in place and return its binary mask (uint8, 0/255)."""
    size = image.shape[0]
    mask = np.zeros((size, size), dtype=np.uint8)
    if kind == "scratch":
        p1 = rng.integers(size // 8, size * 7 // 8, 2)
        p2 = np.clip(p1 + rng.integers(-size // 2, size // 2, 2), 0, size - 1)
        cv2.line(mask, tuple(int(v) for v in p1), tuple(int(v) for v in p2), 255, max(2, size // 40))
        colour = np.array([0.1, 0.1, 0.9], dtype=np.float32)
    else:
        centre = tuple(int(v) for v in rng.integers(size // 6, size * 5 // 6, 2))
        axes = tuple(int(v) for v in rng.integers(size // 20, size // 8, 2))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        colour = np.array([0.05, 0.05, 0.05], dtype=np.float32)
    region = mask > 0
    image[region] = 0.25 * image[region] + 0.75 * colour
    return mask


def make_synthetic_dataset(
    root: str | Path,
    category: str = "woven",
    image_size: int = 128,
    num_train: int = 32,
    num_test_good: int = 8,
    num_test_defect: int = 8,
    seed: int = 0,
) -> Path:
    """Write ``root/category/{train/good, test/good, test/<defect>, ground_truth/<defect>}``.

    ``num_test_defect`` images are made per defect type. Returns ``root``; existing files are rewritten.
    """
    if min(num_train, num_test_good, num_test_defect) < 1 or image_size < 16:
        msg = "need at least one image per split and image_size >= 16"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    base = Path(root) / category

    def save(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), array)

    to_uint8 = lambda img: (np.clip(img, 0, 1) * 255).astype(np.uint8)  # noqa: E731
    for index in range(num_train):
        save(base / "train" / "good" / f"{index:03d}.png", to_uint8(_texture(rng, image_size)))
    for index in range(num_test_good):
        save(base / "test" / "good" / f"{index:03d}.png", to_uint8(_texture(rng, image_size)))
    for kind in DEFECTS:
        for index in range(num_test_defect):
            image = _texture(rng, image_size)
            mask = _paint_defect(rng, image, kind)
            save(base / "test" / kind / f"{index:03d}.png", to_uint8(image))
            save(base / "ground_truth" / kind / f"{index:03d}_mask.png", mask)
    return Path(root)
