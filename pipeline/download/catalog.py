"""Known dataset sources: official URLs, with sizes and checksums where published.

Checksums: DAVIS-2017 sizes and sha256 as recorded by TensorFlow Datasets (davis/checksums.tsv);
DAVIS-2016 md5 from the DAVIS authors' download script (fperazzi/davis-2017, data/get_davis.sh);
PASCAL VOC 2012 and SBD md5 as torchvision verifies them; COCO 2017 md5 of the official zips.
Sources without a published checksum are downloaded unverified (HTTPS/size only): give a
`download.sources.<name>.path` to a copy you trust if that matters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Source:
    name: str
    layout: str  # how `pipeline.download.prepare` arranges it
    files: tuple[RemoteFile, ...]  # empty: behind a login, local copy only
    homepage: str
    size_hint: str = ""
    instructions: str = ""  # how to get it by hand (login-only sources)


DAVIS = "https://data.vision.ee.ethz.ch/csergi/share/davis"
ECSSD = "http://www.cse.cuhk.edu.hk/leojia/projects/hsaliency/data/ECSSD"

SOURCES = [
    Source("davis-2017", "davis", (RemoteFile(
        f"{DAVIS}/DAVIS-2017-trainval-480p.zip", "DAVIS-2017-trainval-480p.zip", 832766765,
        sha256="e3d0b5b77c3d031b000a19e0e25e3e2cac65d183755601bc2cf066df1a2aa492"),),
        "https://davischallenge.org/davis2017/code.html", "794 MiB"),
    Source("davis-2017-full", "davis", (RemoteFile(
        f"{DAVIS}/DAVIS-2017-trainval-Full-Resolution.zip", "DAVIS-2017-trainval-Full-Resolution.zip", 2956935323,
        sha256="519494b320e7a333b98188e0f44e028f379c3312a1fc1a3e8bddd64b2c9ecfaf"),),
        "https://davischallenge.org/davis2017/code.html", "2.8 GiB"),
    Source("davis-2016", "davis", (RemoteFile(
        "https://graphics.ethz.ch/Downloads/Data/Davis/DAVIS-data.zip", "DAVIS-data.zip",
        md5="464ebb594dcbc34e012487f4cd0f8213"),),
        "https://davischallenge.org/davis2016/code.html", "1.9 GiB"),
    Source("youtube-vos-2018", "youtube-vos", (), "https://youtube-vos.org/dataset/vos/", "~10 GiB",
           "YouTube-VOS 2018 needs a login: register at https://youtube-vos.org/dataset/vos/ (CodaLab "
           "competition 19544), download train.zip and valid.zip from the links given there."),
    Source("youtube-vos-2019", "youtube-vos", (), "https://youtube-vos.org/dataset/vos/", "~12 GiB",
           "YouTube-VOS 2019 needs a login: register at https://youtube-vos.org/dataset/vos/ (CodaLab "
           "competition 20127), download train.zip and valid.zip from the links given there."),
    Source("msra10k", "saliency", (RemoteFile("http://mftp.mmcheng.net/Data/MSRA10K_Imgs_GT.zip", "MSRA10K_Imgs_GT.zip"),),
           "https://mmcheng.net/msra10k/", "~140 MiB"),
    Source("ecssd", "saliency", (RemoteFile(f"{ECSSD}/images.zip", "ECSSD-images.zip"),
                                 RemoteFile(f"{ECSSD}/ground_truth_mask.zip", "ECSSD-ground_truth_mask.zip")),
           "https://www.cse.cuhk.edu.hk/leojia/projects/hsaliency/dataset.html", "~60 MiB"),
    Source("hku-is", "saliency", (), "https://sites.google.com/site/ligb86/hkuis", "~1 GiB",
           "HKU-IS is shared by its authors through Google Drive: follow the link on "
           "https://sites.google.com/site/ligb86/hkuis and download the archive (images + gt folders)."),
    Source("duts", "saliency", (RemoteFile("http://saliencydetection.net/duts/download/DUTS-TR.zip", "DUTS-TR.zip"),),
           "http://saliencydetection.net/duts/", "~250 MiB"),
    Source("voc-2012", "voc", (RemoteFile(
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar", "VOCtrainval_11-May-2012.tar",
        md5="6cd6e144f989b92b3379bac3b3de84fd"),),
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/", "1.9 GiB"),
    Source("sbd", "sbd", (RemoteFile(
        "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
        "benchmark.tgz", md5="82b4d87ceb2ed10f6038a1cba92111cb"),),
        "http://home.bharathh.info/pubs/codes/SBD/download.html", "1.4 GiB"),
    Source("coco-2017", "coco", (
        RemoteFile("http://images.cocodataset.org/zips/train2017.zip", "train2017.zip",
                   md5="cced6f7f71b7629ddf16f17bbcfab6b2"),
        RemoteFile("http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                   "annotations_trainval2017.zip", md5="f4bbac642086de4f52a3fdda2de5fa2c")),
        "https://cocodataset.org/#download", "19 GiB"),
]

REGISTRY: dict[str, Source] = {s.name: s for s in SOURCES}
