"""Stopping a stage on SIGINT / SIGTERM, and one writer per run.

`stop_on_signals(what)`: while it is active, the first SIGINT or SIGTERM raises `Stopped` in the
main thread (also when the process was started with SIGINT ignored, as `cmd &` in a script does),
and `stop_requested()` turns true for code in other threads (the in-process training loop checks it
every step). A second signal ends the process at once. Stages turn `Stopped` into an MLflow run
ended as KILLED and the exit code 128 + signal (130 for SIGINT, 143 for SIGTERM), and keep the
checkpoints already written.

`call_interruptibly(fn)`: runs `fn` in a helper thread while the main thread waits, so the signal
lands in the main thread even while `fn` blocks in native code, and libraries that install their
own SIGINT handler from the main thread (Ray Train's `fit` does) cannot take it over.

`RunLock(location, name, stage)`: a lock file `<location>/<name>.lock` ({pid, host, stage, ...})
beside the run's checkpoints, on a local path or a store URI, created atomically (a hard link; on
S3 a conditional create). A second process of the same run is refused with an error naming the
holder; a lock whose process is gone (same host) or not refreshed (other hosts) is taken over. A
holder whose lock was taken over stops its work (see `RunLock`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

from pipeline import storage

T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
HEARTBEAT_S = 30.0  # the holder rewrites its lock this often (other hosts judge it by this)
STALE_S = 300.0  # a lock from another host not refreshed for this long is stale
_stop = threading.Event()
_signal: list[int] = []


class Stopped(KeyboardInterrupt):
    """The stage was asked to stop (SIGINT or SIGTERM). A KeyboardInterrupt: `except Exception` lets it pass."""

    def __init__(self, signum: int = signal.SIGINT):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class RunLocked(RuntimeError):
    """Another live process holds this run."""


def stop_requested() -> bool:
    return _stop.is_set()


def check_stop() -> None:
    """Raise `Stopped` if a stop was asked for (loops in helper threads call it between steps)."""
    if _stop.is_set():
        raise Stopped(_signal[0] if _signal else signal.SIGINT)


@contextmanager
def stop_on_signals(what: str) -> Iterator[None]:
    """SIGINT/SIGTERM -> `Stopped` in the main thread (first signal), immediate exit (second)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def handler(signum, frame):  # noqa: ARG001 - the signal module's signature
        if _stop.is_set():
            print(f"{what}: second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        _signal.append(signum)
        _stop.set()
        print(f"{what}: {signal.Signals(signum).name} received: stopping (checkpoints written so far are kept; "
              "a second signal exits at once)", file=sys.stderr, flush=True)
        raise Stopped(signum)

    _stop.clear()
    _signal.clear()
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def remove_partial(paths: Iterable[Path | str]) -> None:
    """Delete what a stopped stage left half-written: folders, files, store URIs."""
    for path in paths:
        try:
            if storage.is_uri(str(path)):
                storage.delete_dir(str(path))
            elif Path(path).is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                Path(path).unlink(missing_ok=True)
        except OSError as err:  # the stop goes on: say what is left
            print(f"could not remove the partial output {path}: {err}", file=sys.stderr)


def run_stoppable(what: str, body: Callable[[], int],
                  partial: Callable[[], Iterable[Path | str]] = lambda: ()) -> int:
    """Run a stage's `body` (-> exit code) so that SIGINT / SIGTERM stop it: `Stopped` unwinds the
    stage (its `finally` blocks end the MLflow run, KILLED through `tracking.finish_run`, and shut
    Ray down), then the paths `partial()` names are removed and the process exits 130 / 143 at once
    (no interpreter teardown under a helper thread still in native code). Every `stm` stage that
    runs for long calls its work through this; `stm segment` likewise:
    `return run_stoppable("stm segment", lambda: segment(args), lambda: [partial folders])`."""
    try:
        with stop_on_signals(what):
            code = body()
    except KeyboardInterrupt as err:  # Ray's blocking calls turn the handler's Stopped into a plain one
        stop = err if isinstance(err, Stopped) else Stopped(_signal[0] if _signal else signal.SIGINT)
        remove_partial(partial())
        print(f"{what}: {stop}", file=sys.stderr)
        exit_now(stop.exit_code)
    if stop_requested():  # the body caught the stop itself (stm train) and returned its exit code
        remove_partial(partial())
        exit_now(code)
    return code


def call_interruptibly(fn: Callable[[], T], wait_after_stop: float = 0.0) -> T:
    """fn() in a daemon thread; the main thread waits on an event in short waits, where a signal
    handler's `Stopped` is raised (not in Thread.join: a join interrupted by a signal can report a
    running thread as ended). After a stop it waits up to `wait_after_stop` s for fn to notice
    (`check_stop`) and end, then re-raises the `Stopped`."""
    box: dict = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=target, name=f"stm-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    try:
        while not done.wait(0.25):
            pass
    except Stopped:
        _stop.set()
        deadline = time.monotonic() + wait_after_stop
        while not done.is_set() and time.monotonic() < deadline:
            try:
                done.wait(0.25)
            except Stopped:  # pragma: no cover - the handler exits on a second signal
                break
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def exit_now(code: int) -> NoReturn:
    """End a stopped process without interpreter teardown: a helper thread may still be inside
    native code (a training step, a Ray call), and tearing down under it aborts the process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------- one writer per run
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class LockLost(RuntimeError):
    """Another process took this run's lock over: this one must stop writing the run."""


def stop_this_process(message: str) -> None:
    """The default reaction to a lost lock: say so, then SIGTERM to this process, so the stage stops
    the way a user's `kill -TERM` stops it (run KILLED, exit 143) and writes no more checkpoints."""
    print(message, file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


class _S3Object:
    """One S3 object written only under a precondition: create if absent (`If-None-Match: *`),
    replace or delete only the version last seen (`If-Match: <ETag>`), so two writers never both win."""

    def __init__(self, uri: str):
        import boto3

        self.bucket, _, self.key = uri[len("s3://"):].partition("/")
        self.client = boto3.client("s3", endpoint_url=storage.endpoint())

    def put(self, data: bytes, etag: str | None) -> str | None:
        """-> the new ETag, or None when the precondition failed (someone else's object is there)."""
        from botocore.exceptions import ClientError

        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **cond)["ETag"]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            raise

    def get(self) -> tuple[bytes, str] | None:
        try:
            out = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return out["Body"].read(), out["ETag"]

    def delete(self, etag: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except ClientError:
            pass  # not ours any more (taken over), or gone already


class RunLock:
    """`<location>/<name>.lock` while this process runs the stage; `with RunLock(...):`. On S3 a
    stale lock is replaced conditionally on its version (`If-Match`): of two takers one wins. Each
    heartbeat rewrites only this process's version; taken over, it calls `on_lost` (default: SIGTERM
    to itself: the stage stops, its run ends KILLED). gs:// gets a plain write, read back."""

    def __init__(self, location: str, name: str, stage: str,
                 on_lost: Callable[[str], None] = stop_this_process, heartbeat_s: float = HEARTBEAT_S):
        self.stage = stage
        self.uri = storage.join(location, f"{name}.lock") if storage.is_uri(location) else None
        self.path = None if self.uri else Path(location) / f"{name}.lock"
        if self.uri and self.uri.startswith("file://"):  # a shared mount: the local path's O_EXCL works there
            self.path, self.uri = Path(storage.filesystem(self.uri)[1]), None
        self.s3 = _S3Object(self.uri) if self.uri and self.uri.startswith("s3://") else None
        self.etag: str | None = None  # S3: the version of the lock this process wrote last
        self.token = uuid.uuid4().hex
        self.on_lost, self.heartbeat_s, self.lost = on_lost, heartbeat_s, False
        self._beat: threading.Thread | None = None
        self._done = threading.Event()

    @property
    def where(self) -> str:
        return self.uri or str(self.path)

    @property
    def _file(self) -> Path:
        """The local lock file, where there is no store URI."""
        assert self.path is not None, "a run lock has a store URI or a local path"
        return self.path

    def record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "stage": self.stage, "token": self.token,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "heartbeat": time.time(),
                "command": " ".join(sys.argv)[:500]}

    # -- reading and judging a lock
    def _raw(self) -> tuple[bytes, str | None] | None:
        try:
            if self.s3 is not None:
                return self.s3.get()
            return (storage.read_bytes(self.uri) if self.uri else self._file.read_bytes()), None
        except (FileNotFoundError, OSError):
            return None

    @staticmethod
    def _parse(data: bytes) -> dict:
        try:
            return json.loads(data)
        except ValueError:
            return {"pid": -1, "host": "?", "heartbeat": 0.0}  # half-written by a crash: stale

    def read(self) -> dict | None:
        raw = self._raw()
        return None if raw is None else self._parse(raw[0])

    @staticmethod
    def alive(holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            return int(holder.get("pid", -1)) > 0 and _pid_alive(int(holder["pid"]))
        return time.time() - float(holder.get("heartbeat", 0.0)) < STALE_S

    def _refuse(self, holder: dict) -> RunLocked:
        return RunLocked(
            f"{self.where}: this run is in use by process {holder.get('pid')} on {holder.get('host')} "
            f"(stage {holder.get('stage')}, since {holder.get('started')}: {holder.get('command', '')!r}); "
            "wait for it or stop it (Ctrl-C / kill -TERM), then run again. If that process is gone, delete the lock file.")

    # -- taking and giving back
    def acquire(self) -> RunLock:
        raw = self._raw()
        holder = None if raw is None else self._parse(raw[0])
        if holder is not None and self.alive(holder):
            raise self._refuse(holder)
        if holder is not None:
            print(f"run lock {self.where}: taking over a stale lock of process {holder.get('pid')} on "
                  f"{holder.get('host')}", file=sys.stderr)
            if self.s3 is None:
                self._delete()
        data = json.dumps(self.record()).encode()
        if self.s3 is not None:  # create if absent, or replace exactly the stale version read above
            self.etag = self.s3.put(data, raw[1] if raw is not None else None)
            if self.etag is None:
                raise self._refuse(self.read() or {})
        elif self.uri:  # a store without conditional writes: one PUT, read back to see who won a race
            storage.write_bytes(self.uri, data)
            time.sleep(0.2)
            now = self.read()
            if not now or now.get("token") != self.token:
                raise self._refuse(now or {})
        else:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._file.with_name(f".{self._file.name}.{self.token}")
            tmp.write_bytes(data)
            try:
                os.link(tmp, self._file)  # atomic, fails if another process made it first
            except FileExistsError:
                raise self._refuse(self.read() or {}) from None
            finally:
                tmp.unlink(missing_ok=True)
        self._beat = threading.Thread(target=self._heartbeat, name="stm-run-lock", daemon=True)
        self._beat.start()
        return self

    def _lose(self, holder: dict | None) -> None:
        self.lost = True
        who = f"process {holder.get('pid')} on {holder.get('host')}" if holder else "no one (it was deleted)"
        self.on_lost(f"run lock {self.where}: taken over by {who}; stopping this run's work")

    def _heartbeat(self) -> None:
        while not self._done.wait(self.heartbeat_s):
            try:
                if self.s3 is not None:  # rewrite only the version this process wrote: else it was taken
                    record = {**self.record(), "started": (self.read() or {}).get("started")}
                    etag = self.s3.put(json.dumps(record).encode(), self.etag)
                    if etag is None:
                        return self._lose(self.read())
                    self.etag = etag
                    continue
                current = self.read()
                if not current or current.get("token") != self.token:
                    return self._lose(current)
                record = {**current, "heartbeat": time.time()}
                if self.uri:
                    storage.write_bytes(self.uri, json.dumps(record).encode())
                else:
                    tmp = self._file.with_name(f".{self._file.name}.{self.token}")
                    tmp.write_text(json.dumps(record))
                    os.replace(tmp, self._file)
            except OSError:
                pass  # the next beat tries again

    def _delete(self) -> None:
        try:
            if self.uri:
                fs, path = storage.filesystem(self.uri)
                fs.delete_file(path)
            else:
                self._file.unlink(missing_ok=True)
        except (FileNotFoundError, OSError):
            pass

    def release(self) -> None:
        self._done.set()
        if self.s3 is not None:
            if self.etag and not self.lost:
                self.s3.delete(self.etag)  # only the version this process wrote
            return
        current = self.read()
        if current and current.get("token") == self.token:
            self._delete()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
