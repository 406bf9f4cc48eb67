"""Static image + mask sets (the pretraining sources): `<root>/images/<id>.jpg|png` + `<root>/masks/<id>.png`.

Every download preparer (builtin, MSRA10K, ECSSD, DUTS, VOC, SBD, COCO) writes this layout; masks
are palette or 'L' PNGs with object ids (binary 0/255 masks read as object 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stm_core.data.io import DataError, read_image, read_index_mask
from stm_core.data.video import FRAME_SUFFIXES, natural_key


@dataclass(frozen=True)
class ImageMaskPair:
    image: Path
    mask: Path

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 `H x W x 3`, ids uint8 `H x W`); sizes must agree."""
        image = read_image(self.image)
        mask = read_index_mask(self.mask)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{self.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image {self.image} is "
                f"{image.shape[1]}x{image.shape[0]} (W x H)"
            )
        return image, mask


class StaticImageSet:
    """Image + mask pairs from one or more roots, in a stable (sorted) order."""

    def __init__(self, roots: str | Path | Sequence[str | Path], require_masks: bool = True):
        roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
        self.roots = [Path(r) for r in roots]
        self.pairs: list[ImageMaskPair] = []
        for root in self.roots:
            self.pairs += read_image_mask_pairs(root, require_masks)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.pairs[index].load()

    def validate(self) -> None:
        for pair in self.pairs:
            pair.load()


def read_image_mask_pairs(root: str | Path, require_masks: bool = True) -> list[ImageMaskPair]:
    """Pairs by file stem. An image without a mask is an error (or skipped when not `require_masks`);
    a mask without an image is always an error."""
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder not found; a static image set is <root>/images/<id>.jpg + <root>/masks/<id>.png")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")}
    masks = {p.stem: p for p in masks_dir.glob("*.png") if not p.name.startswith(".")}
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(f"{masks[orphans[0]]}: mask has no image {orphans[0]}.* in {images_dir} ({len(orphans)} such)")
    missing = sorted(set(images) - set(masks))
    if missing and require_masks:
        raise DataError(f"{images[missing[0]]}: image has no mask {missing[0]}.png in {masks_dir} ({len(missing)} such)")
    stems = sorted(set(images) & set(masks), key=lambda s: natural_key(Path(s)))
    if not stems:
        raise DataError(f"{root}: no image + mask pairs")
    return [ImageMaskPair(images[s], masks[s]) for s in stems]
