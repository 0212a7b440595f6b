"""Embedded local STAC API: PostgreSQL + PostGIS + pgstac served by stac-fastapi-pgstac.

Why a real database rather than an in-memory catalog: the pipeline's STAC source must behave the same
against this catalog as against a public STAC API, including ``query``, cql2 ``filter``, ``sortby``,
``datetime`` and paging. Lighter backends were tried and silently returned wrong answers (see
DESIGN.md, "Real parts, embedded defaults"), so the embedded default is the real stack, kept cheap:
the cluster lives in a cache directory and is reused, which makes a warm start take seconds.

Everything listens on 127.0.0.1 only, on free ports, with a random password stored next to the
cluster, so several catalogs (or test runs) can coexist on one machine without clashing.
"""

from __future__ import annotations

import atexit
import fcntl
import glob
import hashlib
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from eoprep.errors import EoprepError

__all__ = ["CatalogServerError", "LocalStacServer", "default_data_dir"]

_log = logging.getLogger(__name__)

_INSTALL_HINT = "install postgresql-15-postgis-3 (Debian) or `conda install -c conda-forge postgresql postgis`"
_DB_USER = "eoprep"
_DB_NAME = "eoprep"
_PG_SYSTEM_USER = "postgres"
# Where a root process keeps clusters: a path whose parents are all world-traversable, unlike /root.
_ROOT_STATE_BASE = Path("/var/lib/eoprep")
_API_MODULE = "stac_fastapi.pgstac.app:create_app"
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_MAX_SOCKET_PATH = 103  # bytes of a unix socket path: the smaller of macOS (103) and Linux (107)
# pgstac infers each unregistered property's type from a (here: full) sample of a collection's items;
# registering the numeric ones makes pgstac cast them (to_int/to_float) when filtering and sorting.
_REGISTER_NUMERIC_QUERYABLES = """
    SELECT upsert_queryable(m.name, m.definition, m.property_wrapper, NULL, ARRAY[m.collection])
    FROM missing_queryables(%s, 100) AS m
    WHERE m.definition->>'type' IN ('number', 'integer')
"""


class CatalogServerError(EoprepError):
    """The local catalog could not be started, loaded or stopped; the message says what to do."""


def default_data_dir() -> Path:
    """Return the directory that holds the local catalog by default.

    The catalog is a cache of STAC metadata that can be rebuilt from its sources, so it follows the
    XDG cache convention; ``$EOPREP_CACHE`` moves every eoprep cache at once (CI, shared disks).

    Returns
    -------
    Path
        ``$EOPREP_CACHE/catalog``, else ``$XDG_CACHE_HOME/eoprep/catalog``, else
        ``~/.cache/eoprep/catalog``.
    """
    if os.environ.get("EOPREP_CACHE"):
        base = Path(os.environ["EOPREP_CACHE"]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "eoprep"
    else:
        base = Path.home() / ".cache" / "eoprep"
    return base / "catalog"


def _free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1 (bind to port 0), so runs never collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find_pg_bindir() -> Path:
    """Locate the PostgreSQL server binaries.

    ``pg_config --bindir`` names the installation the user set up (conda puts it on PATH); Debian
    keeps server binaries outside PATH in /usr/lib/postgresql/<major>/bin, newest major preferred;
    a plain ``initdb`` on PATH covers the rest.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            candidates.append(Path(out))

    def major(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else -1

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise CatalogServerError(f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: {_INSTALL_HINT}")


def _check_postgis(bindir: Path) -> None:
    """Fail before creating a cluster when PostGIS is missing from this PostgreSQL installation.

    The extension's control file sits in the installation's share directory; when it cannot be
    located (no ``pg_config`` next to the server), ``CREATE EXTENSION`` later reports it instead.
    """
    pg_config = bindir / "pg_config"
    if not pg_config.is_file():
        return
    try:
        sharedir = subprocess.run(
            [str(pg_config), "--sharedir"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return
    if sharedir and not (Path(sharedir) / "extension" / "postgis.control").is_file():
        raise CatalogServerError(f"PostGIS is not installed for the PostgreSQL in {bindir}: {_INSTALL_HINT}")


def _command_line(pid: int) -> str | None:
    """Return a process's command line: "" when no such process runs, None when we cannot tell.

    ``/proc`` on Linux (works without procps, a zombie reads as gone), ``ps`` elsewhere (macOS).
    """
    if pid <= 0:
        return ""
    if Path("/proc/self").is_dir():
        try:
            raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except FileNotFoundError:
            return ""
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()
    ps = shutil.which("ps")
    if ps is None:
        return None
    try:
        return subprocess.run(
            [ps, "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _tail(path: Path, lines: int = 20) -> str:
    """Last lines of a log file, for error messages that must be diagnosable without digging."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return f"last lines of {path}:\n" + "\n".join(text.splitlines()[-lines:])


def _rotate(path: Path) -> None:
    """Keep one previous log generation so a nightly-restarted catalog cannot fill the disk."""
    try:
        if path.stat().st_size > _LOG_ROTATE_BYTES:
            path.replace(path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass


class LocalStacServer:
    """A local STAC API over a PostgreSQL + PostGIS + pgstac cluster kept in a cache directory.

    ``start`` reuses an existing cluster (a warm start is pgstac's version check plus the API's
    start-up), or creates one (``initdb``, ``CREATE EXTENSION postgis``, pgstac migrations). Both
    PostgreSQL and the API bind 127.0.0.1 on free ports; the database password is random, stored
    only in a 0600 file next to the cluster, and handed to the API through its environment.

    Layout under ``data_dir``: ``logs/`` (``postgres.log``, ``api.log``, ``setup.log``), ``server.lock``
    (held while this object serves the catalog), ``api.pid``; and, when not running as root,
    ``pgdata/`` (the cluster), ``run/`` (its unix socket) and ``pgpassword``.

    PostgreSQL refuses to run as root. As root, ``initdb``/``pg_ctl`` run as the ``postgres``
    system user through ``runuser``, and the cluster, socket and password live in
    ``/var/lib/eoprep/<hash of data_dir>/`` instead, owned by ``postgres`` with mode 0700. Why not
    under ``data_dir``: the default ``data_dir`` is below ``/root`` (mode 0700), which ``postgres``
    cannot traverse, and opening it up would mean changing the permissions of the user's home.
    Only the server process needs those files; logs stay in ``data_dir`` because the server writes
    them through file descriptors opened by this process.

    Parameters
    ----------
    data_dir
        Directory of this catalog; created if missing. See :func:`default_data_dir`.
    port
        Port of the API on 127.0.0.1; a free one is picked when None.
    log
        Receives one-line progress messages (cluster creation, URL); defaults to this module's logger.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, log: Callable[[str], None] | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self._requested_port = port
        self._log = log if log is not None else _log.info
        self._as_root = os.geteuid() == 0
        if self._as_root:
            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
            self._state_dir = _ROOT_STATE_BASE / digest
        else:
            self._state_dir = self.data_dir
        self._logs_dir = self.data_dir / "logs"
        self._lock_file: IO[str] | None = None
        self._api: subprocess.Popen[bytes] | None = None
        self._api_log: IO[bytes] | None = None
        self._bindir: Path | None = None
        self._pg_port: int | None = None
        self._url: str | None = None

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        """Root URL of the running STAC API, e.g. ``http://127.0.0.1:40123``."""
        if self._url is None:
            raise CatalogServerError("the local catalog is not running: call LocalStacServer.start() first")
        return self._url

    @property
    def pgdata(self) -> Path:
        """Directory of the PostgreSQL cluster (outside ``data_dir`` when running as root)."""
        return self._state_dir / "pgdata"

    def start(self) -> str:
        """Start PostgreSQL and the API, creating the cluster on first use.

        Idempotent: a running server returns its URL. A previous run that was killed leaves a stale
        ``postmaster.pid`` or even live processes; those are cleaned up here (only when their command
        line proves they belong to this catalog), so a crash never blocks the next start.

        Returns
        -------
        str
            The API root URL, ``http://127.0.0.1:PORT``.

        Raises
        ------
        CatalogServerError
            When binaries are missing, another process serves this ``data_dir``, or a component does
            not come up in time (the message carries the tail of the relevant log).
        """
        if self._url is not None and self._api is not None and self._api.poll() is None:
            return self._url
        self.stop()
        self._logs_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._bindir = _find_pg_bindir()
            self._prepare_state_dir()
            self._reap_previous_run()
            if not (self.pgdata / "PG_VERSION").is_file():
                _check_postgis(self._bindir)
                self._initdb()
            self._start_postgres()
            self._setup_database()
            self._start_api()
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)
        self._log(f"local STAC API at {self._url} (data in {self.data_dir})")
        return self.url

    def load(self, collections: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]]) -> None:
        """Upsert collections, then items, into the catalog.

        Upsert (pypgstac ``Methods.upsert``) makes loading repeatable: rows whose content is unchanged
        are left alone, changed items replace the stored ones, and an interrupted load can simply be
        run again. Collections go first because pgstac partitions items by collection.

        Numeric item properties not yet known to pgstac (e.g. ``eo:cloud_cover``) are then
        registered as queryables of their collection. Without that, pgstac compares and sorts an
        unregistered property as JSON text, so ``sortby`` on cloud cover puts 80 before 5 and 35.
        Finding them scans the loaded collections' items once per call.

        Parameters
        ----------
        collections
            STAC Collection dicts.
        items
            STAC Item dicts; each ``collection`` must be in the catalog or in ``collections``.
        """
        from pypgstac.load import Loader, Methods

        with self._pgstac_db() as db:
            loader = Loader(db=db)
            if collections:
                loader.load_collections(iter(collections), Methods.upsert)
            if items:
                loader.load_items(iter(items), Methods.upsert)
            for collection_id in sorted({str(item["collection"]) for item in items}):
                db.connect().execute(_REGISTER_NUMERIC_QUERYABLES, (collection_id,))

    def stop(self) -> None:
        """Stop the API and PostgreSQL (``pg_ctl stop -m fast``); safe to call more than once.

        Fast shutdown rolls back open transactions and checkpoints, so the next start needs no
        crash recovery. Also registered with :mod:`atexit` while running, so a forgotten ``stop``
        does not leave a database behind.
        """
        atexit.unregister(self.stop)
        if self._api is not None:
            if self._api.poll() is None:
                self._api.terminate()
                try:
                    self._api.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self._api.kill()
                    self._api.wait()
            self._api = None
            (self.data_dir / "api.pid").unlink(missing_ok=True)
        if self._api_log is not None:
            self._api_log.close()
            self._api_log = None
        self._url = None
        try:
            if self._pg_port is not None and self._bindir is not None:
                self._pg_port = None
                self._pg_ctl_stop()
        finally:
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()
                self._lock_file = None

    def destroy(self) -> None:
        """Stop the server and delete the cluster, its password, socket directory and logs.

        The way to reset a catalog, and the only way to remove a root-owned cluster, which lives
        outside ``data_dir`` (see the class docstring) and would otherwise outlive it.

        Raises
        ------
        CatalogServerError
            When another process serves this catalog.
        """
        self.stop()
        if not self.data_dir.is_dir():
            return
        self._acquire_lock()
        try:
            if self._as_root:
                shutil.rmtree(self._state_dir, ignore_errors=True)
            for name in ("pgdata", "pgdata.init", "run"):
                shutil.rmtree(self._state_dir / name, ignore_errors=True)
            (self._state_dir / "pgpassword").unlink(missing_ok=True)
            shutil.rmtree(self._logs_dir, ignore_errors=True)
            (self.data_dir / "api.pid").unlink(missing_ok=True)
        finally:
            self.stop()
        (self.data_dir / "server.lock").unlink(missing_ok=True)

    def __enter__(self) -> LocalStacServer:
        """Start the server for the duration of a ``with`` block."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server, whether or not the block raised."""
        self.stop()

    # ------------------------------------------------------------------ processes and files

    def _acquire_lock(self) -> None:
        """Hold an exclusive lock on ``server.lock`` so two processes never drive one cluster."""
        lock_file = (self.data_dir / "server.lock").open("a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            owner = lock_file.read().strip() or "another process"
            lock_file.close()
            raise CatalogServerError(
                f"the catalog in {self.data_dir} is already served by {owner}; "
                "stop that process or use another data directory"
            ) from None
        lock_file.truncate(0)
        lock_file.write(f"pid {os.getpid()}")
        lock_file.flush()
        self._lock_file = lock_file

    def _as_postgres(self, cmd: list[str]) -> list[str]:
        """Prefix a command so it runs as the ``postgres`` system user when we are root."""
        if not self._as_root:
            return cmd
        if shutil.which("runuser") is None:
            raise CatalogServerError(
                "running as root needs `runuser` (util-linux) to start PostgreSQL as user postgres; "
                "install util-linux or run eoprep as a normal user"
            )
        return ["runuser", "-u", _PG_SYSTEM_USER, "--", *cmd]

    def _chown_to_postgres(self, path: Path) -> None:
        """Hand a path we created to the ``postgres`` system user (root only)."""
        if self._as_root:
            entry = pwd.getpwnam(_PG_SYSTEM_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _prepare_state_dir(self) -> None:
        """Create the directories PostgreSQL writes to, owned by the user that runs it."""
        if self._as_root:
            try:
                pwd.getpwnam(_PG_SYSTEM_USER)
            except KeyError:
                raise CatalogServerError(
                    f"running as root needs a '{_PG_SYSTEM_USER}' system user to run PostgreSQL: "
                    f"{_INSTALL_HINT}, or run eoprep as a normal user"
                ) from None
            _ROOT_STATE_BASE.mkdir(parents=True, exist_ok=True)
            _ROOT_STATE_BASE.chmod(0o755)
            self._state_dir.mkdir(exist_ok=True)
            self._chown_to_postgres(self._state_dir)
            self._state_dir.chmod(0o700)
        run_dir = self._state_dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._chown_to_postgres(run_dir)
        run_dir.chmod(0o700)

    def _run_pg(self, cmd: list[str], logfile: Path, what: str, timeout: float = 300) -> None:
        """Run a PostgreSQL tool with output appended to ``logfile``; fail with the log's tail."""
        with logfile.open("ab") as out:
            try:
                proc = subprocess.run(
                    self._as_postgres(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self._state_dir,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise CatalogServerError(f"{what} timed out after {timeout:.0f} s; see {logfile}") from None
        if proc.returncode != 0:
            raise CatalogServerError(f"{what} failed (exit {proc.returncode}); {_tail(logfile)}")

    def _password(self) -> str:
        """Return the cluster's password, creating it (0600) the first time."""
        path = self._state_dir / "pgpassword"
        if not path.is_file():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24))
        return path.read_text().strip()

    def _initdb(self) -> None:
        """Create the cluster in a scratch directory and rename it into place when complete.

        The rename makes a half-created cluster (killed initdb, full disk) impossible to mistake for
        a usable one on the next start. Authentication is scram-sha-256 for the socket and for TCP.
        """
        assert self._bindir is not None
        self._log(f"creating PostgreSQL cluster in {self.pgdata} (first start; takes a few seconds)")
        scratch = self._state_dir / "pgdata.init"
        if scratch.exists():
            shutil.rmtree(scratch)
        pwfile = self._state_dir / "initdb.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self._password() + "\n")
        self._chown_to_postgres(pwfile)
        try:
            self._run_pg(
                [
                    str(self._bindir / "initdb"),
                    "-D",
                    str(scratch),
                    "-U",
                    _DB_USER,
                    f"--pwfile={pwfile}",
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                self._logs_dir / "setup.log",
                "initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        scratch.rename(self.pgdata)

    def _reap_previous_run(self) -> None:
        """Clean up after a previous owner of this catalog that died without ``stop``.

        We hold the lock, so any API or postmaster still recorded for this ``data_dir`` is an orphan.
        A process is only signalled when its command line proves it is ours (uvicorn serving
        stac-fastapi-pgstac on the recorded port; postgres with this ``-D``). A ``postmaster.pid``
        whose PID is gone or now belongs to another program (PID reuse after a reboot or in a new
        container) is deleted, since PostgreSQL would refuse to start over a live PID. Where process
        command lines cannot be read, ``postmaster.pid`` is left alone: deleting the lock of a live
        server would let two servers write one cluster.
        """
        api_pid_file = self.data_dir / "api.pid"
        if api_pid_file.is_file():
            fields = api_pid_file.read_text().split()
            pid, port = (int(fields[0]), fields[1]) if len(fields) == 2 and fields[0].isdigit() else (0, "")
            cmd = _command_line(pid) or ""
            if _API_MODULE in cmd and f"--port {port}" in cmd:
                self._log(f"stopping orphaned catalog API (pid {pid}) from a previous run")
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if _API_MODULE not in (_command_line(pid) or ""):
                        break
                    time.sleep(0.1)
            api_pid_file.unlink(missing_ok=True)
        postmaster_pid = self.pgdata / "postmaster.pid"
        if not postmaster_pid.is_file():
            return
        first_line = postmaster_pid.read_text(errors="replace").splitlines()[:1]
        pid = int(first_line[0]) if first_line and first_line[0].strip().isdigit() else 0
        cmd = _command_line(pid)
        if cmd is None:
            return  # cannot tell: leave it to PostgreSQL's own stale-lock check
        if "postgres" in cmd and str(self.pgdata) in cmd:
            self._log(f"stopping orphaned PostgreSQL (pid {pid}) from a previous run")
            self._pg_ctl_stop()
        else:
            postmaster_pid.unlink(missing_ok=True)

    def _start_postgres(self) -> None:
        """Start the postmaster on 127.0.0.1 and a free port, socket in the cluster's ``run/``.

        Settings go on the command line rather than into postgresql.conf because the port changes on
        every start. Without ``-l``, pg_ctl hands the server our log file descriptor, which also
        works when the server runs as another user that could not open the file itself. JIT is off:
        pgstac's search functions look expensive to the planner, and compiling them cost more than
        running them (a search of 8 items: 40 ms with JIT, 23 ms without).
        """
        assert self._bindir is not None
        self._pg_port = _free_port()
        socket_dir = str(self._state_dir / "run")
        if len(socket_dir) + len("/.s.PGSQL.65535") > _MAX_SOCKET_PATH:
            # Nothing here connects through the socket (pg_ctl -w reads postmaster.pid), so a data_dir
            # too deep for a unix socket path costs only local psql access, not the server.
            socket_dir = ""
        options = [
            "-c",
            "listen_addresses=127.0.0.1",
            "-p",
            str(self._pg_port),
            "-c",
            f"unix_socket_directories={socket_dir}",
            "-c",
            "jit=off",
        ]
        logfile = self._logs_dir / "postgres.log"
        _rotate(logfile)
        self._run_pg(
            [
                str(self._bindir / "pg_ctl"),
                "start",
                "-D",
                str(self.pgdata),
                "-w",
                "-t",
                "120",
                "-o",
                shlex.join(options),
            ],
            logfile,
            "starting PostgreSQL",
            timeout=180,
        )

    def _pg_ctl_stop(self) -> None:
        """Fast shutdown; a server that is already gone is not an error."""
        assert self._bindir is not None
        if not (self.pgdata / "postmaster.pid").is_file():
            return
        self._run_pg(
            [str(self._bindir / "pg_ctl"), "stop", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60"],
            self._logs_dir / "postgres.log",
            "stopping PostgreSQL",
            timeout=120,
        )

    def _conninfo(self, dbname: str = _DB_NAME) -> str:
        """libpq connection string over TCP to 127.0.0.1 (keyword form: no URL escaping pitfalls)."""
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host="127.0.0.1",
            port=self._pg_port,
            user=_DB_USER,
            password=self._password(),
            dbname=dbname,
            application_name="eoprep",
        )

    def _setup_database(self) -> None:
        """Ensure the database, PostGIS and the pgstac schema exist and are current.

        Runs on every start: each step is a no-op when already done (pypgstac's migrate compares
        versions first), and running it always upgrades the schema after a pypgstac upgrade.
        """
        import psycopg
        from pypgstac.migrate import Migrate

        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (_DB_NAME,)).fetchone()
            if exists is None:
                conn.execute(f'CREATE DATABASE "{_DB_NAME}"')
        with psycopg.connect(self._conninfo(), autocommit=True) as conn:
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
            except psycopg.Error as err:
                raise CatalogServerError(f"PostGIS is not usable ({err.sqlstate}): {_INSTALL_HINT}") from None
        with self._pgstac_db() as db:
            version = Migrate(db).run_migration()
        _log.debug("pgstac schema at version %s", version)

    @contextmanager
    def _pgstac_db(self) -> Iterator[Any]:
        """A pypgstac ``PgstacDB`` on a pool we own, so its connections are closed afterwards.

        ``PgstacDB`` creates its own pool when given none and never closes it; passing ours avoids
        leaking a connection and a worker thread per call.
        """
        from psycopg_pool import ConnectionPool
        from pypgstac.db import PgstacDB

        if self._pg_port is None:
            raise CatalogServerError("the local catalog is not running: call LocalStacServer.start() first")
        with ConnectionPool(self._conninfo(), min_size=1, max_size=1, open=True) as pool:
            with PgstacDB(pool=pool) as db:
                yield db

    def _start_api(self) -> None:
        """Run stac-fastapi-pgstac under uvicorn and wait until it answers ``/`` and ``/collections``.

        stac-fastapi-pgstac 7.x reads its database from ``PGUSER``, ``PGPASSWORD``, ``PGHOST``,
        ``PGPORT`` and ``PGDATABASE`` (pydantic-settings, also from a ``.env`` file in the working
        directory, hence ``cwd`` is our logs directory). Its PID and port go to ``api.pid`` so an
        orphaned API can be recognised by the next start.
        """
        port = self._requested_port if self._requested_port is not None else _free_port()
        env = dict(os.environ)
        env.setdefault("STAC_FASTAPI_TITLE", "eoprep local catalog")
        env.setdefault("STAC_FASTAPI_DESCRIPTION", f"Local STAC API over {self.data_dir}")
        env.setdefault("STAC_FASTAPI_LANDING_ID", "eoprep-local")
        env.setdefault("STAC_FASTAPI_VERSION", "1.0.0")
        env.update(
            PGUSER=_DB_USER,
            PGPASSWORD=self._password(),
            PGHOST="127.0.0.1",
            PGPORT=str(self._pg_port),
            PGDATABASE=_DB_NAME,
        )
        logfile = self._logs_dir / "api.log"
        _rotate(logfile)
        self._api_log = logfile.open("ab")
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            _API_MODULE,
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ]
        self._api = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._api_log,
            stderr=subprocess.STDOUT,
            cwd=self._logs_dir,
            env=env,
        )
        (self.data_dir / "api.pid").write_text(f"{self._api.pid} {port}")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        pending = ["/", "/collections"]
        while pending:
            if self._api.poll() is not None:
                code = self._api.returncode
                raise CatalogServerError(f"the catalog API exited with code {code}; {_tail(logfile)}")
            if time.monotonic() > deadline:
                raise CatalogServerError(f"the catalog API did not answer {url} within 120 s; {_tail(logfile)}")
            try:
                with urllib.request.urlopen(url + pending[0], timeout=5) as response:
                    json.load(response)
                pending.pop(0)
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.1)
        self._url = url
        if self._lock_file is not None:
            self._lock_file.truncate(0)
            self._lock_file.write(f"pid {os.getpid()} at {url}")
            self._lock_file.flush()
