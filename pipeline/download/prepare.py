"""Turn an extracted dataset into the layout the stages read.

- video sets: the DAVIS layout (`JPEGImages/`, `Annotations/`, `ImageSets/`) or YouTube-VOS
  (`train/`, `valid/` with `meta.json`) at the source folder's top;
- static sets: `images/<id>.<ext>` + `masks/<id>.png` (palette, object ids), converted from
  saliency masks (0/255 -> object 1), VOC `SegmentationObject` (255 void -> background),
  SBD instance `.mat` files, or COCO instance polygons rasterised with `skimage.draw.polygon`
  (crowd regions are left as background; ids by decreasing area, at most 255).
Every preparer takes (extracted folder, output folder) and moves files rather than copying.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from stm_core.data.io import DataError, write_index_mask

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
MASK_DIR = re.compile(r"(^|[-_ ])(gt|mask|masks|ground[-_ ]?truth(s)?|annotation(s)?)($|[-_ ])", re.IGNORECASE)


def _find_dir(src: Path, child: str) -> Path:
    """The shallowest folder under `src` (itself included) that holds `child`."""
    found = sorted((p.parent for p in src.rglob(child) if p.is_dir() or p.is_file()), key=lambda p: len(p.parts))
    if not found:
        raise DataError(f"{src}: no {child!r} found in the extracted data")
    return found[0]


def _move_children(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for child in sorted(src.iterdir()):
        target = out / child.name
        if target.exists():  # two archives of one set (e.g. DAVIS trainval + test) share folders
            if child.is_dir() and target.is_dir():
                _move_children(child, target)
                continue
            raise DataError(f"{child}: would overwrite {target}")
        os.replace(child, target)


def prepare_raw(src: Path, out: Path) -> None:
    """Keep the extracted files as they are."""
    _move_children(src, out)


def prepare_davis(src: Path, out: Path) -> None:
    _move_children(_find_dir(src, "JPEGImages"), out)


def prepare_youtube_vos(src: Path, out: Path) -> None:
    """Every split folder (train/, valid/, ..._all_frames/) found anywhere below `src`."""
    folders = sorted({p.parent for p in src.rglob("JPEGImages") if p.is_dir()}, key=lambda p: len(p.parts))
    if not folders:
        raise DataError(f"{src}: no YouTube-VOS split (a folder with JPEGImages/ and meta.json)")
    out.mkdir(parents=True, exist_ok=True)
    for split in folders:
        os.replace(split, out / split.name)


def _binary_to_ids(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"))
    return (grey > 127).astype(np.uint8)


def prepare_saliency(src: Path, out: Path) -> None:
    """Salient-object sets (MSRA10K, ECSSD, HKU-IS, DUTS): pair images and 0/255 masks by file stem.
    A mask is the .png twin of a .jpg in the same folder, or a file whose folder is named like
    gt / mask / ground_truth (DUTS-TR-Mask, ground_truth_mask)."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            by_stem[p.stem].append(p)
    pairs = []
    for stem, files in sorted(by_stem.items()):
        twins = len(files) == 2 and files[0].parent == files[1].parent and \
            sorted(f.suffix.lower() for f in files) in ([".jpeg", ".png"], [".jpg", ".png"])
        if twins:  # MSRA10K: 1.jpg (image) beside 1.png (mask)
            masks = [f for f in files if f.suffix.lower() == ".png"]
        else:
            masks = [f for f in files if MASK_DIR.search(f.parent.name)]
        images = [f for f in files if f not in masks]
        if len(images) == 1 and len(masks) == 1:
            pairs.append((stem, images[0], masks[0]))
    if not pairs:
        raise DataError(f"{src}: found no image + mask pairs (masks go in a folder named gt/mask/ground_truth)")
    for stem, image, mask in pairs:
        write_index_mask(out / "masks" / f"{stem}.png", _binary_to_ids(mask))
        (out / "images").mkdir(parents=True, exist_ok=True)
        os.replace(image, out / "images" / f"{stem}{image.suffix.lower()}")


def prepare_voc(src: Path, out: Path) -> None:
    """PASCAL VOC 2012: instance masks from SegmentationObject (255 = void boundary -> background)."""
    root = _find_dir(src, "SegmentationObject")
    names = sorted(p.stem for p in (root / "SegmentationObject").glob("*.png"))
    for name in names:
        with Image.open(root / "SegmentationObject" / f"{name}.png") as im:
            ids = np.asarray(im).copy()
        ids[ids == 255] = 0
        write_index_mask(out / "masks" / f"{name}.png", ids)
        (out / "images").mkdir(parents=True, exist_ok=True)
        os.replace(root / "JPEGImages" / f"{name}.jpg", out / "images" / f"{name}.jpg")


def prepare_sbd(src: Path, out: Path) -> None:
    """SBD (benchmark.tgz): instance masks from `dataset/inst/*.mat` (GTinst.Segmentation)."""
    from scipy.io import loadmat

    root = _find_dir(src, "inst")
    for mat in sorted((root / "inst").glob("*.mat")):
        try:
            seg = loadmat(mat, squeeze_me=True, struct_as_record=False)["GTinst"].Segmentation
        except (KeyError, AttributeError, ValueError) as err:
            raise DataError(f"{mat}: not an SBD instance file: {err}") from err
        ids = np.asarray(seg, dtype=np.uint8)
        write_index_mask(out / "masks" / f"{mat.stem}.png", ids)
        (out / "images").mkdir(parents=True, exist_ok=True)
        os.replace(root / "img" / f"{mat.stem}.jpg", out / "images" / f"{mat.stem}.jpg")


def rasterize_instances(anns: list[dict], height: int, width: int, min_area: float = 0.0) -> np.ndarray:
    """COCO polygon instances -> ids `H x W` uint8 (largest first, so small ones stay on top)."""
    from skimage.draw import polygon

    ids = np.zeros((height, width), np.uint8)
    kept = [a for a in anns if not a.get("iscrowd") and isinstance(a.get("segmentation"), list)
            and a.get("area", 0) >= min_area]
    kept.sort(key=lambda a: (-a.get("area", 0), a.get("id", 0)))
    for k, ann in enumerate(kept[:255], start=1):
        for poly in ann["segmentation"]:
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            if len(xy) < 3:
                continue
            rr, cc = polygon(xy[:, 1], xy[:, 0], shape=(height, width))
            ids[rr, cc] = k
    return ids


def prepare_coco(src: Path, out: Path, split: str = "train2017", min_area: float = 100.0) -> None:
    """COCO 2017: `annotations/instances_<split>.json` + `<split>/*.jpg`; images without instances are skipped."""
    ann_file = next(iter(sorted(src.rglob(f"instances_{split}.json"))), None)
    if ann_file is None:
        raise DataError(f"{src}: annotations/instances_{split}.json not found")
    images_dir = _find_dir(src, split) / split
    coco = json.loads(ann_file.read_text())
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for img in sorted(coco["images"], key=lambda i: i["id"]):
        ids = rasterize_instances(by_image.get(img["id"], []), img["height"], img["width"], min_area)
        if not ids.any():
            continue
        stem = Path(img["file_name"]).stem
        write_index_mask(out / "masks" / f"{stem}.png", ids)
        os.replace(images_dir / img["file_name"], out / "images" / img["file_name"])


PREPARERS: dict[str, Callable[[Path, Path], None]] = {
    "raw": prepare_raw,
    "davis": prepare_davis,
    "youtube-vos": prepare_youtube_vos,
    "images": lambda src, out: _move_children(_find_dir(src, "masks"), out),
    "saliency": prepare_saliency,
    "voc": prepare_voc,
    "sbd": prepare_sbd,
    "coco": prepare_coco,
}


def prepare(layout: str, src: Path, out: Path) -> None:
    if layout not in PREPARERS:
        raise DataError(f"unknown layout {layout!r}; known: {sorted(PREPARERS)}")
    PREPARERS[layout](src, out)
    shutil.rmtree(src, ignore_errors=True)
