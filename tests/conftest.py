"""Shared fixtures: a real ``dicomgate serve`` subprocess, DCMTK helpers and corpora.

The gateway runs as a user runs it: the console script, a YAML config file, real sockets.
Nothing is downloaded at test time (pydicom's bundled test files only, by exact name).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # for ``from tests.corpus import ...``
    sys.path.insert(0, str(ROOT))

from tests.corpus import make_ct_series, make_mr_series  # noqa: E402

from dicomgate.egress.base import Delivery  # noqa: E402
from dicomgate.index.db import Index  # noqa: E402

DICOMGATE = shutil.which("dicomgate") or str(Path(sys.executable).parent / "dicomgate")
AE_TITLE = "DICOMGATE"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0

needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("echoscu") is None, reason="needs DCMTK"
)

# ``TEST_DATABASE=postgresql`` gives every gateway a test starts (unless the test sets
# ``database.url`` itself) a fresh PostgreSQL database instead of SQLite; ``make test``
# re-runs the database-heavy integration modules that way. (Not a ``DICOMGATE_`` name: the
# gateway reads those as configuration.)
TEST_DB = os.environ.get("TEST_DATABASE", "sqlite").strip().lower() or "sqlite"
if TEST_DB not in ("sqlite", "postgresql"):
    raise pytest.UsageError(f"TEST_DATABASE must be sqlite or postgresql, not {TEST_DB!r}")
PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


def sqlite_only(why: str) -> pytest.MarkDecorator:
    """Skip under ``TEST_DATABASE=postgresql``: the test is about SQLite itself
    (``why`` says how), so there is nothing of PostgreSQL for it to check."""
    return pytest.mark.skipif(TEST_DB == "postgresql", reason=f"SQLite-only: {why}")


def pg_admin() -> Any:
    """An autocommit connection to the PostgreSQL server on 127.0.0.1:5432.

    The server is part of the test environment: unreachable is a failure, not a skip.
    """
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as error:
        pytest.fail(
            "PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth) is unreachable: "
            + str(error).splitlines()[0]
        )


def create_pg_database() -> tuple[str, str]:
    """(name, URL) of a new, empty PostgreSQL database; drop it with drop_pg_database."""
    name = f"dicomgate_test_{uuid.uuid4().hex[:12]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    _created_databases.add(name)
    return name, f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    with pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _created_databases.discard(name)


@pytest.fixture
def own_database() -> Iterator[tuple[str, str]]:
    """(name, URL) of a PostgreSQL database of the test's own, whatever TEST_DATABASE says,
    for tests that take it away (:func:`pg_cut_off`); dropped afterwards."""
    name, url = create_pg_database()
    try:
        yield name, url
    finally:
        with pg_admin() as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        drop_pg_database(name)


def pg_cut_off(name: str, allow: bool) -> None:
    """The database refuses (or accepts again) connections; open ones are ended, as in a
    server restart or a failover."""
    with pg_admin() as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


_created_databases: set[str] = set()


@pytest.fixture(scope="session", autouse=True)
def _drop_leftover_pg_databases() -> Iterator[None]:
    """Databases made for gateways that no fixture stopped (a test that errored early)."""
    yield
    for name in sorted(_created_databases):
        drop_pg_database(name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests run only when selected (``-m slow``); CI runs the bounded ones."""
    if config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow: select with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago, BELOW the kernel's ephemeral
    range: a server started on it later (a destination that comes "up" mid-test, a node
    restarted after kill -9) must find it free. An ephemeral port can meanwhile become the
    source port of any outgoing connection -- even of a connect to that very port while
    nothing listens there, which TCP completes as a self-connection (seen in CI: a
    gateway retrying a down storescp held the port storescp was about to bind)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10000, low)
        if port in _HANDED_OUT:  # free now, but promised to a server not started yet
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    raise AssertionError("no free port below the ephemeral range")


# Ports this test process has handed out: two calls before either server binds (a
# gateway's DIMSE and HTTP ports) must not get the same one (seen in a run: both 23580).
_HANDED_OUT: set[int] = set()


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: without TCP_NODELAY every PDU waits ~40 ms."""
    return {**os.environ, "TCP_NODELAY": "1"}


def large_mr(path: Path, megabytes: int) -> Path:
    """A multi-frame MR of about ``megabytes`` MB with a new SOP Instance UID, saved at
    ``path`` (its pixel data is not kept in memory afterwards)."""
    import pydicom

    ds = pydicom.dcmread(bundled_file("MR_small.dcm"))
    frames = megabytes * 1024 * 1024 // (64 * 64 * 2)
    ds.NumberOfFrames = frames
    ds.PixelData = bytes(range(256)) * (frames * 64 * 64 * 2 // 256)
    ds.SOPInstanceUID = f"2.25.{uuid.uuid4().int}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def bundled_file(name: str) -> Path:
    """A file bundled with pydicom, by exact name (never downloaded)."""
    from pydicom.data import get_testdata_file

    bundled = Path(get_testdata_file.__code__.co_filename).parent / "test_files" / name
    assert bundled.is_file(), f"{name} is not bundled with pydicom"
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(path)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class GatewayProcess:
    """One ``dicomgate serve`` subprocess and what a test needs to poke at it."""

    root: Path
    config: dict[str, Any]
    expected_exit: int | None = 0  # checked at teardown; None: do not check
    proc: subprocess.Popen[bytes] | None = None
    pg_database: str | None = None  # the PostgreSQL database made for it, dropped by release
    _index: Index | None = field(default=None, repr=False)
    _log_fh: Any = field(default=None, repr=False)

    # -- addresses ----------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "dicomgate.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "gateway.log"

    @property
    def data(self) -> Path:
        return Path(self.config["storage"]["path"])

    @property
    def node_dir(self) -> Path:
        """What is this node's own: ``storage.path`` with SQLite, ``storage.path/nodes/<name>``
        with PostgreSQL (where nodes may share the store folder)."""
        if not self.db_url.startswith("postgres"):
            return self.data
        from dicomgate.config import NodeConfig

        return self.data / "nodes" / NodeConfig(**self.config.get("node", {})).resolved_name()

    @property
    def spool(self) -> Path:
        return self.node_dir / "spool"

    @property
    def ae_title(self) -> str:
        return str(self.config["dimse"].get("ae_title", AE_TITLE))

    @property
    def dimse_port(self) -> int:
        return int(self.config["dimse"]["port"])

    @property
    def http_port(self) -> int:
        return int(self.config["http"]["port"])

    @property
    def db_url(self) -> str:
        return str(self.config["database"]["url"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    # -- process ------------------------------------------------------------------------

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")

    def start(self) -> None:
        """Start the console script and wait for ``/readyz`` 200."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.write_config()
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self.proc = subprocess.Popen(
            [DICOMGATE, "serve", "--config", str(self.config_path)],
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(
                    f"gateway exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            status, body = self.http_get("/readyz")
            if status == 200:
                return
            # Started, with a store below storage.min_free_bytes (tests that fill it on
            # purpose): not ready for a load balancer, but up.
            if status == 503 and isinstance(body, dict) and body.get("failing") == ["store"]:
                return
            time.sleep(0.05)
        pytest.fail(f"gateway not ready after {timeout} s:\n" + self.log_tail())

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, Any]:
        """(status, parsed JSON body) or (0, None) when nothing answers."""
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            exc.close()
            try:
                return exc.code, json.loads(body or b"null")
            except ValueError:
                return exc.code, body
        except (urllib.error.URLError, OSError):
            return 0, None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout`` s); returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self._reap()
                pytest.fail(f"gateway did not stop {timeout} s after SIGTERM:\n" + self.log_tail())
        self._reap()
        return self.proc.returncode

    def kill9(self) -> None:
        """``kill -9``: no clean-up of any kind in the gateway."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reap()

    def restart(self) -> None:
        """Start again on the same config, data and ports (after kill9 or terminate)."""
        if self.running():
            code = self.terminate()
            assert code == 0, self.log_tail()
        self.close_index()
        self.proc = None
        self.start()

    def _reap(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    # -- inspection ---------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_count(self, event: str) -> int:
        """How many log lines carry the event name ``event``."""
        return sum(1 for line in self.log_text().splitlines() if f" {event} " in line)

    def wait_log(self, event: str, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.log_count(event) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"no {count} x {event} in the log:\n" + self.log_tail())
            time.sleep(0.02)

    @property
    def index(self) -> Index:
        """The gateway's index database, opened from the test process (read side)."""
        if self._index is None:
            self._index = Index.open(self.db_url)
        return self._index

    def close_index(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    def release(self) -> None:
        """After the last stop: drop the PostgreSQL database made for this gateway."""
        self.close_index()
        if self.pg_database is not None:
            drop_pg_database(self.pg_database)
            self.pg_database = None

    def stored_path(self, row: Mapping[str, Any]) -> Path:
        return self.data / str(row["relpath"])

    # -- DCMTK peers --------------------------------------------------------------------

    def echoscu(self, *args: str, called: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "echoscu",
                "-to",
                "10",
                "-aec",
                called or self.ae_title,
                *args,
                "127.0.0.1",
                str(self.dimse_port),
            ],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def storescu(
        self, files: list[Path] | list[str], *args: str, called: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """storescu ARGS host port FILES; output captured (stdout + stderr)."""
        return subprocess.run(
            ["storescu", "-to", "10", "-aec", called or self.ae_title, *args]
            + ["127.0.0.1", str(self.dimse_port)]
            + [str(f) for f in files],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=240,
            check=False,
        )


def new_gateway(root: Path, overrides: Mapping[str, Any] | None = None) -> GatewayProcess:
    """A gateway (not started) under ``root``: SQLite and store in ``root/data``, DIMSE and
    HTTP on free 127.0.0.1 ports, ``overrides`` merged into that config.

    Under ``TEST_DATABASE=postgresql`` the database is a fresh PostgreSQL database
    (unless ``overrides`` names one), dropped by :meth:`GatewayProcess.release`."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    base: dict[str, Any] = {
        "storage": {"path": str(data)},
        "database": {"url": f"sqlite:///{data}/index.db"},
        "dimse": {"ae_title": AE_TITLE, "host": "127.0.0.1", "port": free_port()},
        "http": {"host": "127.0.0.1", "port": free_port()},
    }
    pg_database = None
    if TEST_DB == "postgresql" and "url" not in (overrides or {}).get("database", {}):
        pg_database, base["database"]["url"] = create_pg_database()
    gw = GatewayProcess(root=root, config=_merge(base, overrides or {}))
    gw.pg_database = pg_database
    return gw


@contextlib.contextmanager
def loaded_gateway(root: Path, files: list[Path]) -> Iterator[GatewayProcess]:
    """A started gateway holding ``files`` (sent with storescu), for module-scoped
    fixtures; stopped afterwards, and it must exit cleanly."""
    gw = new_gateway(root)
    gw.start()
    try:
        sent = gw.storescu(files)
        assert sent.returncode == 0, sent.stdout
        yield gw
    finally:
        gw.close_index()
        code = gw.terminate()
        gw.release()
        assert code == 0, gw.log_tail()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: ``gateway(overrides=None, start=True)`` -> a running :class:`GatewayProcess`.

    Storage and database live under ``tmp_path``; DIMSE and HTTP listen on free
    127.0.0.1 ports. At teardown each gateway gets SIGTERM and must exit with
    ``expected_exit`` (0 unless the test changed it).
    """
    started: list[GatewayProcess] = []

    def factory(overrides: Mapping[str, Any] | None = None, start: bool = True) -> GatewayProcess:
        gw = new_gateway(tmp_path / f"gw{len(started)}", overrides)
        started.append(gw)
        if start:
            gw.start()
        else:
            gw.write_config()
        return gw

    yield factory

    failures = []
    for gw in started:
        gw.close_index()
        if gw.proc is not None:
            code = gw.terminate()
            if gw.expected_exit is not None and code != gw.expected_exit:
                failures.append(
                    f"gateway exited {code}, expected {gw.expected_exit}:\n{gw.log_tail()}"
                )
        gw.release()
    if failures:
        pytest.fail("\n".join(failures))


@dataclass(frozen=True)
class SlowPacs:
    """DCMTK ``storescp`` as AE ``SLOW`` that takes a second over each instance
    (``--sleep-during 1``) and keeps every receipt (``+uf``) under ``folder``: sends to it
    are still under way when a test cuts something off."""

    port: int
    folder: Path

    @property
    def destination(self) -> dict[str, Any]:
        return {"type": "dimse", "ae_title": "SLOW", "host": "127.0.0.1", "port": self.port}

    def received(self) -> list[str]:
        """SOP Instance UID of every receipt (a resent instance counts twice)."""
        import pydicom

        return [
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in sorted(self.folder.iterdir())
        ]


@pytest.fixture
def slow_pacs(tmp_path: Path) -> Iterator[SlowPacs]:
    pacs = SlowPacs(free_port(), tmp_path / "slow-pacs")
    pacs.folder.mkdir()
    proc = subprocess.Popen(
        [
            *("storescp", "-aet", "SLOW", "--sleep-during", "1", "+uf"),
            *("--output-directory", str(pacs.folder), str(pacs.port)),
        ],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield pacs
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass(frozen=True)
class Corpus:
    """Synthetic series written once per session (deterministic, nothing downloaded)."""

    root: Path

    def mr(self, name: str, count: int, seed: int) -> list[Path]:
        """``count`` small MR files of one series, cached under ``name``."""
        folder = self.root / name
        done = folder / ".done"
        if done.exists():
            return sorted(folder.glob("*.dcm"))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder)
        paths = make_mr_series(folder, count, seed=seed)
        done.touch()
        return paths

    def ct(self, name: str, count: int, seed: int) -> list[Path]:
        folder = self.root / name
        done = folder / ".done"
        if done.exists():
            return sorted(folder.glob("*.dcm"))
        paths = make_ct_series(folder, count, seed=seed)
        done.touch()
        return paths


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("corpus"))


ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass
class Orthanc:
    http_port: int
    proc: subprocess.Popen[bytes]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
            return json.loads(r.read())


@dataclass
class OrthancProcess:
    """An Orthanc started by :func:`launch_orthanc`."""

    http_port: int
    dicom_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def launch_orthanc(
    root: Path, extra: Mapping[str, Any] | None = None, args: tuple[str, ...] = ()
) -> OrthancProcess:
    """Start Orthanc with its DICOMweb plugin on free ports from a config generated under
    ``root`` (``extra`` merged in; the ports and folders are ours) and wait for its REST
    API. Skips when Orthanc or the plugin is not installed."""
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("needs orthanc and orthanc-dicomweb")
    root.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "dicomgate-test",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **(extra or {}),
        "StorageDirectory": str(root / "orthanc-db"),
        "IndexDirectory": str(root / "orthanc-db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log_path = root / "orthanc.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(ORTHANC), *args, str(config_path)], stdout=log, stderr=subprocess.STDOUT
        )
    server = OrthancProcess(http_port, dicom_port, proc, log_path)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            pytest.fail("Orthanc exited:\n" + log_path.read_text())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=2):
                return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail("Orthanc did not start")
            time.sleep(0.1)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    launched = launch_orthanc(tmp_path)
    try:
        yield Orthanc(launched.http_port, launched.proc)
    finally:
        launched.stop()


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL database per test module on 127.0.0.1:5432, dropped afterwards.

    Fails (with the reason) when the server is unreachable: it is part of the test setup.
    """
    name, url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(name)


def sop_uid_of(path: Path) -> str:
    """The SOP Instance UID in a file's data set."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    return str(ds.SOPInstanceUID)


# -- helpers shared by the egress and routing tests --------------------------------------


def delivery_of(path: Path, job_id: int, route: str = "test") -> Delivery:
    """A :class:`Delivery` for a Part 10 file, its UIDs read from the file."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Delivery(
        job_id=job_id,
        path=path,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        size=path.stat().st_size,
        route=route,
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # time.monotonic() on arrival


@dataclass
class RecordingServer:
    """A tiny HTTP server on a free port: records POSTs, answers ``status`` and ``body``;
    the first requests take their status and extra headers from ``first`` while it lasts."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/dicom+json"
    requests: list[Recorded] = field(default_factory=list)
    port: int = 0
    first: list[tuple[int, dict[str, str]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def http_server() -> Iterator[RecordingServer]:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = RecordingServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            state.requests.append(Recorded("POST", self.path, headers, body, time.monotonic()))
            status, extra = state.first.pop(0) if state.first else (state.status, {})
            self.send_response(status)
            self.send_header("Content-Length", str(len(state.body)))
            self.send_header("Content-Type", state.content_type)
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            with contextlib.suppress(ConnectionError):  # the client read enough
                self.wfile.write(state.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def assert_relayed(sent: bytes, stored: bytes) -> None:
    """``sent`` is the stored file as a relay sends it: the same data set, byte for byte,
    and the same file meta less our arrival context ((0002,0100), (0002,0102): the sender's
    AE titles and IP address stay with us)."""
    import io

    from pydicom import dcmread

    def split(data: bytes) -> tuple[Any, bytes]:
        assert data[128:132] == b"DICM"
        offset = 144 + int.from_bytes(data[140:144], "little")
        return dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta, data[offset:]

    sent_meta, sent_data = split(sent)
    stored_meta, stored_data = split(stored)
    assert sent_data == stored_data, "the data set differs from the stored one"
    assert 0x00020102 not in sent_meta and 0x00020100 not in sent_meta
    for keyword in ("MediaStorageSOPInstanceUID", "MediaStorageSOPClassUID", "TransferSyntaxUID"):
        assert sent_meta.get(keyword) == stored_meta.get(keyword), keyword
