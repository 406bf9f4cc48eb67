"""`stm download` over a loopback HTTP server: resume, retries, checksums, safe extraction, sources."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.download import stage as dl
from pipeline.download.catalog import REGISTRY, RemoteFile, Source
from pipeline.download.fetch import ChecksumError, DownloadError, UnsafeArchiveError, extract, fetch
from pipeline.download.prepare import prepare, rasterize_instances
from stm_core.data import StaticImageSet, read_davis, read_index_mask


class Server:
    """Serves `files` (path -> bytes) with Range support; can drop a transfer or answer 503 first."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}  # path -> bytes sent before the first transfer is cut
        self.busy: dict[str, int] = {}  # path -> number of 503 answers before serving
        self.ranges: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                data = outer.files.get(self.path)
                outer.ranges.append(self.headers.get("Range"))
                if data is None:
                    self.send_error(404)
                    return
                if outer.busy.get(self.path, 0) > 0:
                    outer.busy[self.path] -= 1
                    self.send_error(503)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = outer.drop_after.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _payload(n=300_000) -> bytes:
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_resume_after_dropped_connection(server, tmp_path):
    data = _payload()
    server.files["/a.bin"] = data
    server.drop_after["/a.bin"] = 100_000
    out = fetch(f"{server.url}/a.bin", tmp_path / "a.bin", sha256=hashlib.sha256(data).hexdigest(),
                backoff=0.01, progress=False, chunk=8192)
    assert out.read_bytes() == data
    assert server.ranges[0] is None and server.ranges[1].startswith("bytes=") and server.ranges[1] != "bytes=0-"
    assert not (tmp_path / "a.bin.part").exists()


def test_resume_a_previous_partial_file(server, tmp_path):
    data = _payload()
    server.files["/b.bin"] = data
    (tmp_path / "b.bin.part").write_bytes(data[:12345])
    fetch(f"{server.url}/b.bin", tmp_path / "b.bin", size=len(data), md5=hashlib.md5(data).hexdigest(), progress=False)
    assert server.ranges == ["bytes=12345-"]
    assert (tmp_path / "b.bin").read_bytes() == data


def test_retry_on_busy_server(server, tmp_path):
    server.files["/c.bin"] = b"hello"
    server.busy["/c.bin"] = 2
    assert fetch(f"{server.url}/c.bin", tmp_path / "c.bin", backoff=0.01, progress=False).read_bytes() == b"hello"
    server.busy["/c.bin"] = 5
    with pytest.raises(DownloadError, match="HTTP 503"):
        fetch(f"{server.url}/c.bin", tmp_path / "c2.bin", retries=1, backoff=0.01, progress=False)
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.url}/nope", tmp_path / "d.bin", progress=False)


def test_checksum_failure_leaves_nothing(server, tmp_path):
    server.files["/e.bin"] = b"corrupted content"
    with pytest.raises(ChecksumError, match=r"sha256 is [0-9a-f]+, expected 0000"):
        fetch(f"{server.url}/e.bin", tmp_path / "e.bin", sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ChecksumError, match="size is 17 bytes, expected 99"):
        fetch(f"{server.url}/e.bin", tmp_path / "e.bin", size=99, progress=False)


def _zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def _tar(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return path


def test_safe_extraction(tmp_path):
    ok = tmp_path / "ok.zip"
    ok.write_bytes(_zip({"d/a.txt": b"a", "d/sub/b.txt": b"b"}))
    extract(ok, tmp_path / "out")
    assert (tmp_path / "out/d/sub/b.txt").read_bytes() == b"b"
    cases = {
        "traversal.zip": (_zip({"../evil.txt": b"x"}), r"'\.\./evil\.txt' escapes"),
        "absolute.zip": (_zip({"/tmp/evil.txt": b"x"}), "absolute path"),
        "link.zip": (_zip({"a.txt": b"a"}, {"ln": "/etc/passwd"}), "symbolic link"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnsafeArchiveError, match=message):
            extract(tmp_path / name, tmp_path / name.replace(".", "_"))
        assert not any((tmp_path / name.replace(".", "_")).rglob("*"))  # nothing written
    with pytest.raises(UnsafeArchiveError, match="points outside"):
        extract(_tar(tmp_path / "l.tgz", {"a.txt": b"a"}, {"x/ln": "../../outside"}), tmp_path / "t1")
    with pytest.raises(UnsafeArchiveError, match="escapes"):
        extract(_tar(tmp_path / "t.tgz", {"../../x.txt": b"a"}), tmp_path / "t2")
    extract(_tar(tmp_path / "in.tgz", {"a/b.txt": b"b"}, {"a/ln": "b.txt"}), tmp_path / "t3")  # a link inside is fine
    assert (tmp_path / "t3/a/ln").read_bytes() == b"b"
    (tmp_path / "bad.zip").write_bytes(ok.read_bytes()[:40])
    with pytest.raises(DownloadError, match="not a zip or tar"):
        extract(tmp_path / "bad.zip", tmp_path / "t4")


def _davis_zip() -> bytes:
    entries = {"DAVIS/ImageSets/2017/val.txt": b"s\n"}
    for t in range(3):
        img = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 40 * t, np.uint8)).save(img, "JPEG")
        mask = io.BytesIO()
        m = Image.fromarray(np.eye(8, dtype=np.uint8), "P")
        m.save(mask, "PNG")
        entries[f"DAVIS/JPEGImages/480p/s/{t:05d}.jpg"] = img.getvalue()
        entries[f"DAVIS/Annotations/480p/s/{t:05d}.png"] = mask.getvalue()
    return _zip(entries)


def _params(tmp_path: Path, download: dict) -> Path:
    (tmp_path / ".git").mkdir(exist_ok=True)  # marks the project root
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"download": download}, sort_keys=False))
    return path


def test_remote_source_end_to_end(server, tmp_path, monkeypatch):
    data = _davis_zip()
    server.files["/DAVIS.zip"] = data
    source = Source("tiny-davis", "davis", (RemoteFile(f"{server.url}/DAVIS.zip", "DAVIS.zip", len(data),
                                                       sha256=hashlib.sha256(data).hexdigest()),), "test")
    monkeypatch.setitem(REGISTRY, source.name, source)
    params = _params(tmp_path, {"sources": {"tiny-davis": {}}})
    assert dl.run_download(params) == ["tiny-davis"]
    target = tmp_path / "data/raw/tiny-davis"
    assert (target / dl.MARKER).is_file()
    (seq,) = read_davis(target, "val")
    assert len(seq) == 3 and seq.annotated == [0, 1, 2]
    assert dl.run_download(params) == []  # up to date: nothing fetched again
    assert len(server.ranges) == 1


def test_corrupt_download_leaves_no_dataset(server, tmp_path, monkeypatch):
    data = _davis_zip()
    server.files["/DAVIS.zip"] = data[:-10] + b"0123456789"  # damaged in transit
    source = Source("tiny-davis", "davis", (RemoteFile(f"{server.url}/DAVIS.zip", "DAVIS.zip",
                                                       sha256=hashlib.sha256(data).hexdigest()),), "test")
    monkeypatch.setitem(REGISTRY, source.name, source)
    with pytest.raises(ChecksumError):
        dl.run_download(_params(tmp_path, {"sources": {"tiny-davis": {}}}))
    assert not (tmp_path / "data/raw").exists() or not any((tmp_path / "data/raw").iterdir())
    # a checksum-free archive that is not an archive: the stage fails, no half-dataset appears
    server.files["/DAVIS.zip"] = b"garbage"
    monkeypatch.setitem(REGISTRY, source.name, Source("tiny-davis", "davis", (RemoteFile(f"{server.url}/DAVIS.zip", "x.zip"),), "t"))
    with pytest.raises(DownloadError, match="not a zip or tar"):
        dl.run_download(_params(tmp_path, {"sources": {"tiny-davis": {}}}))
    assert not any((tmp_path / "data/raw").iterdir())


def test_local_sources_folder_archive_and_file_url(tmp_path):
    zip_path = tmp_path / "DAVIS.zip"
    zip_path.write_bytes(_davis_zip())
    extract(zip_path, tmp_path / "unzipped")
    params = _params(tmp_path, {"sources": {
        "mine-zip": {"path": str(zip_path), "layout": "davis"},
        "mine-dir": {"path": "unzipped", "layout": "davis"},
        "mine-url": {"path": zip_path.as_uri(), "layout": "davis"}}})
    assert dl.run_download(params) == ["mine-zip", "mine-dir", "mine-url"]
    for name in ("mine-zip", "mine-dir", "mine-url"):
        assert len(read_davis(tmp_path / "data/raw" / name, "val")) == 1
    assert (tmp_path / "unzipped/DAVIS/JPEGImages").is_dir()  # a local folder is copied, not moved


def test_source_errors(tmp_path):
    with pytest.raises(dl.ParamsError, match="unknown source 'nope'"):
        dl.run_download(_params(tmp_path, {"sources": {"nope": {}}}))
    with pytest.raises(DownloadError, match=r"needs a login.*download\.sources\.youtube-vos-2019\.path"):
        dl.run_download(_params(tmp_path, {"sources": {"youtube-vos-2019": {}}}))
    with pytest.raises(dl.ParamsError, match="unknown key"):
        dl.run_download(_params(tmp_path, {"sourcez": []}))
    assert dl.run(dl.argparse.Namespace(params=str(_params(tmp_path, {"sources": {"nope": {}}})), sources=None,
                                        list=False)) == 1


def test_builtin_sources(tmp_path):
    images = {"seed": 1, "count": 4, "size": 48}
    videos = {"seed": 1, "height": 48, "width": 48, "frames": 5, "train_sequences": 1, "val_sequences": 2}
    cfg = {"sources": {"builtin-images": images, "builtin-videos": videos}}
    params = _params(tmp_path, cfg)
    assert dl.run_download(params) == ["builtin-images", "builtin-videos"]
    raw = tmp_path / "data/raw"
    assert len(StaticImageSet(raw / "builtin-images")) == 4
    assert len(read_davis(raw / "builtin-videos", "val")) == 2
    marker = json.loads((raw / "builtin-videos" / dl.MARKER).read_text())
    assert marker["kind"] == "builtin" and marker["seed"] == 1
    assert dl.run_download(params) == []
    videos["seed"] = 2  # one source's params changed: only that source is rebuilt
    assert dl.run_download(_params(tmp_path, cfg)) == ["builtin-videos"]


def test_each_source_reads_only_its_own_entry(tmp_path, monkeypatch):
    """`stm download --source X` (stage download@X) reads download.root and download.sources.X and no
    other source's settings: what dvc.yaml declares for it."""
    from pipeline.params import READS_ENV, load_params

    reads_file = tmp_path / "reads.jsonl"
    monkeypatch.setenv(READS_ENV, str(reads_file))
    params = load_params(_params(tmp_path, {"root": "data/raw", "sources": {"builtin-images": {"count": 2}, "davis-2017": {}}}))
    common, chosen = dl.read_params(params, ["builtin-images"])
    assert list(chosen) == ["builtin-images"] and chosen["builtin-images"].count == 2
    reads = {r for r in params._sink if not r.endswith(".*")}  # noqa: SLF001 - the recorder's own set
    assert "download.sources.builtin-images.count" in reads and "download.root" in reads
    assert not any(r.startswith("download.sources.davis-2017") for r in reads)
    with pytest.raises(dl.ParamsError, match=r"download\.sources: no entry for \['coco-2017'\]"):
        dl.read_params(params, ["coco-2017"])
    with pytest.raises(dl.ParamsError, match=r"download\.sources\.builtin-images: unknown key"):
        dl.read_params(load_params(_params(tmp_path, {"sources": {"builtin-images": {"cnt": 2}}})))


def test_preparers(tmp_path):
    # MSRA10K: jpg + png twins in one folder
    src = tmp_path / "msra/MSRA10K_Imgs_GT/Imgs"
    src.mkdir(parents=True)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(src / "1.jpg")
    Image.fromarray(np.where(np.eye(6), 255, 0).astype(np.uint8), "L").save(src / "1.png")
    prepare("saliency", tmp_path / "msra", tmp_path / "msra-out")
    np.testing.assert_array_equal(read_index_mask(tmp_path / "msra-out/masks/1.png"), np.eye(6, dtype=np.uint8))
    # DUTS: images and masks in sibling folders, masks named by folder
    for folder, name in (("DUTS-TR-Image", "a.jpg"), ("DUTS-TR-Mask", "a.png")):
        (tmp_path / "duts/DUTS-TR" / folder).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), 255, np.uint8)).convert("RGB").save(tmp_path / "duts/DUTS-TR" / folder / name)
    prepare("saliency", tmp_path / "duts", tmp_path / "duts-out")
    assert read_index_mask(tmp_path / "duts-out/masks/a.png").min() == 1
    assert (tmp_path / "duts-out/images/a.jpg").is_file()
    # COCO polygons (crowd regions stay background)
    anns = [{"id": 1, "area": 16, "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]},
            {"id": 2, "area": 50, "iscrowd": 1, "segmentation": {"counts": [0, 64], "size": [8, 8]}}]
    ids = rasterize_instances(anns, 8, 8)
    assert ids[2, 2] == 1 and ids[0, 0] == 0 and ids.max() == 1
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2017").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(coco / "train2017/000000000001.jpg")
    (coco / "annotations/instances_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 8, "width": 8}],
        "annotations": [{**anns[0], "image_id": 1, "area": 200}]}))
    prepare("coco", coco, tmp_path / "coco-out")
    assert len(StaticImageSet(tmp_path / "coco-out")) == 1
