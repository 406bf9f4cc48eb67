"""A real `mlflow server --app-name basic-auth` on loopback: anonymous requests are refused, the
pipeline's own tracking calls succeed with credentials from the environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_basic_auth_server_refuses_anonymous_and_takes_pipeline_runs(tmp_path: Path, monkeypatch) -> None:
    from pipeline import tracking

    port, password = free_port(), "test-" + os.urandom(8).hex()
    config = tmp_path / "basic_auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path}/auth.db\n"
                      "admin_username = admin\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                if status(f"{url}/health") == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start in 45 s: " + (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)

        assert status(f"{url}/api/2.0/mlflow/experiments/search?max_results=1") == 401

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        run_id = tracking.create_run(url, "auth-test", "train-stm", {"lr": 0.1}, {"stm_role": "test"})
        logger = tracking.RunLogger(url, run_id)
        logger.metrics({"loss": 0.5}, step=1)
        tracking.finish_run(url, run_id)
        run = tracking.client(url).get_run(run_id)
        assert run.data.metrics["loss"] == 0.5 and run.info.status == "FINISHED"

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(Exception, match="401|nauthorized|ermission"):
            tracking.client(url).get_run(run_id)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        log.close()
