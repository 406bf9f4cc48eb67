"""Storage by URI and the multi-node guards (fast: no cluster, fake node lists, a file:// store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import storage
from pipeline.cluster import ClusterError, require_shared, resolve_tracking_uri

ONE = [{"NodeID": "a", "NodeManagerAddress": "10.0.0.1", "Alive": True}]
TWO = ONE + [{"NodeID": "b", "NodeManagerAddress": "10.0.0.2", "Alive": True}]
LOOPBACK_TWO = [{"NodeID": "a", "NodeManagerAddress": "127.0.0.1"}, {"NodeID": "b", "NodeManagerAddress": "127.0.0.1"}]


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # each test says which cluster it is on


def test_local_paths_are_fine_on_one_node_and_refused_on_two():
    require_shared("train", {"train.data": "data/raw/x", "ray.storage": "/abs/checkpoints"}, ONE)
    require_shared("train", {"train.data": "s3://b/x", "ray.storage": "file:///mnt/shared/ckpt"}, TWO)
    with pytest.raises(ClusterError, match=r"train.data = data/raw/x.*2 nodes.*storage.root") as err:
        require_shared("train", {"train.data": "data/raw/x", "ray.storage": "s3://b/c"}, TWO)
    assert "ray.storage" not in str(err.value)


@pytest.mark.parametrize("uri", ["sqlite:////repo/mlflow.db", "file:///repo/mlruns", "/repo/mlruns"])
def test_a_local_tracking_store_is_refused_on_a_cluster(uri):
    assert resolve_tracking_uri(uri, ONE, driver_ip="10.0.0.1") == uri
    with pytest.raises(ClusterError, match="mlflow server"):
        resolve_tracking_uri(uri, TWO, driver_ip="10.0.0.1")


def _answers_at(*uris: str):
    return lambda uri: uri in uris


def test_a_loopback_server_becomes_the_driver_nodes_address():
    anywhere = lambda uri: True  # noqa: E731 (a server listening on every address)
    assert resolve_tracking_uri("http://127.0.0.1:5000", TWO, driver_ip="10.0.0.1", answers=anywhere) == \
        "http://10.0.0.1:5000"
    assert resolve_tracking_uri("http://localhost:5000/x", TWO, driver_ip="10.0.0.2", answers=anywhere) == \
        "http://10.0.0.2:5000/x"
    assert resolve_tracking_uri("http://mlflow.internal:5000", TWO, driver_ip="10.0.0.1") == "http://mlflow.internal:5000"
    # every node on this host (a loopback test cluster): loopback reaches the server from all of them
    assert resolve_tracking_uri("http://127.0.0.1:5000", LOOPBACK_TWO, driver_ip="127.0.0.1") == "http://127.0.0.1:5000"
    with pytest.raises(ClusterError, match="loopback"):
        resolve_tracking_uri("http://127.0.0.1:5000", TWO, driver_ip="127.0.0.1")


def test_a_loopback_server_that_does_not_answer_at_the_drivers_address_is_refused():
    """A worker is never handed a loopback address, even while every node is on the driver's host:
    a node that joins later from another host would not reach it."""
    loopback_only = _answers_at("http://127.0.0.1:5000")
    same_host = [{"NodeID": "a", "NodeManagerAddress": "10.0.0.1"}, {"NodeID": "b", "NodeManagerAddress": "10.0.0.1"}]
    for nodes in (same_host, TWO):
        with pytest.raises(ClusterError, match=r"no server takes requests at the driver node's address "
                                               r"http://10.0.0.1:5000.*--host 0.0.0.0"):
            resolve_tracking_uri("http://127.0.0.1:5000", nodes, driver_ip="10.0.0.1", answers=loopback_only)


def test_server_answers_probes_a_real_address():
    import http.server
    import threading

    from pipeline.cluster import server_answers

    class Refusing(http.server.BaseHTTPRequestHandler):  # MLflow's answer to a Host it does not accept
        def do_GET(self):
            self.send_error(403 if self.path == "/refuse/version" else 404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server_answers(f"http://127.0.0.1:{server.server_port}")  # 404: a server, answering
        assert not server_answers(f"http://127.0.0.1:{server.server_port}/refuse")
    finally:
        server.shutdown()
        server.server_close()
    assert not server_answers(f"http://127.0.0.1:{server.server_port}", timeout_s=1.0)


def test_a_run_against_a_cluster_is_multi_node_whoever_is_up(monkeypatch):
    """An autoscaling cluster may hold only its head when a stage starts; the nodes that join later
    share no disk with it and cannot reach its loopback address."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as `ray job submit` sets it
    with pytest.raises(ClusterError, match=r"ray.storage = checkpoints.*a cluster \(1 nodes now, more may join\)"):
        require_shared("train", {"ray.storage": "checkpoints"}, ONE)
    require_shared("train", {"ray.storage": "s3://b/ckpt"}, ONE)
    assert resolve_tracking_uri("http://127.0.0.1:5000", ONE, driver_ip="10.0.0.1", answers=lambda uri: True) == \
        "http://10.0.0.1:5000"
    with pytest.raises(ClusterError, match="local store"):
        resolve_tracking_uri("sqlite:////repo/mlflow.db", ONE, driver_ip="10.0.0.1")
    # a head registered at loopback: every node of it is on this host
    assert resolve_tracking_uri("http://127.0.0.1:5000", LOOPBACK_TWO[:1], driver_ip="127.0.0.1") == \
        "http://127.0.0.1:5000"


def test_uris_join_and_unknown_schemes_are_errors():
    assert storage.join("s3://b/run", "./data/synthetic", "stm/") == "s3://b/run/data/synthetic/stm"
    assert storage.remote_mirror("", Path("/w"), Path("/w/data")) is None
    assert storage.remote_mirror("s3://b/run/", Path("/w"), Path("/w/models/main/model.pt")) == \
        "s3://b/run/models/main/model.pt"
    with pytest.raises(storage.StorageError, match="'ftp://x/y': unsupported scheme"):
        storage.filesystem("ftp://x/y")


def test_publish_mirrors_once_and_node_cache_reads_it_back(tmp_path: Path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "1.txt").write_text("one")
    (src / "2.bin").write_bytes(b"\0" * 10)
    uri = (tmp_path / "store").as_uri() + "/data/src"
    assert storage.publish(src, uri) is True
    assert storage.publish(src, uri) is False  # same content: nothing copied
    assert storage.list_files(uri) == ["2.bin", storage.MIRROR_MARK, "a/1.txt"]
    copy = storage.node_cache(uri, str(tmp_path / "cache"))
    assert (copy / "a" / "1.txt").read_text() == "one"
    (src / "a" / "1.txt").write_text("changed")
    assert storage.publish(src, uri) is True
    fresh = storage.node_cache(uri, str(tmp_path / "cache"))
    assert fresh != copy and (fresh / "a" / "1.txt").read_text() == "changed"
    storage.write_bytes(uri + "/x/y.json", b"{}")
    assert storage.read_bytes(uri + "/x/y.json") == b"{}"
    with pytest.raises(FileNotFoundError, match="nothing stored"):
        storage.download_dir(uri + "/missing", tmp_path / "out")


def test_train_settings_put_data_checkpoints_and_models_under_the_store(tmp_path: Path):
    import yaml

    from pipeline.train.settings import settings

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["storage"]["root"] = "s3://bucket/stm"
    (tmp_path / ".git").mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    s = settings(tmp_path / "params.yaml", "main", "stm")
    assert s.storage() == "s3://bucket/stm/checkpoints"
    assert s.data_location() == "s3://bucket/stm/data/raw/builtin-videos"
    assert s.model_uri() == "s3://bucket/stm/models/main/model.pt"
    params["storage"]["root"] = ""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    s = settings(tmp_path / "params.yaml", "pretrain", "strmn")
    assert s.storage() == str(tmp_path / "checkpoints") and s.model_uri() is None
    assert s.data_location() == str(tmp_path / "data" / "synthetic" / "strmn")
