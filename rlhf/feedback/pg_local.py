"""A throwaway local PostgreSQL server: ``initdb`` in a temporary folder, listening on 127.0.0.1 only,
on a free port, removed on :meth:`LocalPostgres.stop`. The tests and benchmarks run the labeling
store on it; it also lets a person try the PostgreSQL store without setting a server up.

Needs the server binaries (Debian: ``apt-get install postgresql``; they live in
/usr/lib/postgresql/<version>/bin, which is searched after PATH). PostgreSQL refuses to run as
root, so under root the server runs as the ``postgres`` system user (which the Debian package
creates) and its folder is handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.errors import ConfigError


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return versions[-1] if versions else None


def unavailable_reason() -> str | None:
    """Why a local server cannot be started here, or None if it can."""
    if find_binary("initdb") is None or find_binary("pg_ctl") is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install 'psycopg[binary]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no 'postgres' user to run the server as (PostgreSQL refuses root)"
        if shutil.which("setpriv") is None:
            return "running as root without setpriv to drop to the 'postgres' user"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalPostgres:
    folder: Path
    port: int
    user: str = "rlhf"
    _as_user: list[str] = field(default_factory=list)
    _pg_ctl: str = ""

    @property
    def base_url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}"

    def url(self, database: str = "postgres") -> str:
        return f"{self.base_url}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"rlhf_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        subprocess.run(self._as_user + [self._pg_ctl, "-D", str(self.folder / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "LocalPostgres":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_postgres(durable: bool = True, timeout_s: float = 60.0) -> LocalPostgres:
    """Start a server; ``durable=False`` turns fsync off (tests: nothing here outlives a power cut)."""
    reason = unavailable_reason()
    if reason:
        raise ConfigError(reason)
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    # Not under the caller's temporary folder: that may be private to root, and the server may run
    # as another user.
    folder = Path(tempfile.mkdtemp(prefix="rlhf-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
    os.chmod(folder, 0o700)
    server = LocalPostgres(folder, _free_port(), _as_user=as_user, _pg_ctl=pg_ctl)
    try:
        run = dict(capture_output=True, text=True, timeout=timeout_s, cwd=str(folder))
        done = subprocess.run(as_user + [initdb, "-D", str(folder / "data"), "-A", "trust", "-U", server.user, "-E", "UTF8",
                                         "--locale=C", "--no-sync"], **run)
        if done.returncode != 0:
            raise ConfigError(f"initdb failed: {done.stderr.strip()[-1000:]}")
        options = (f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories={folder} "
                   f"-c max_connections=200 -c fsync={'on' if durable else 'off'}")
        done = subprocess.run(as_user + [pg_ctl, "-D", str(folder / "data"), "-l", str(folder / "server.log"), "-w",
                                         "-t", str(int(timeout_s)), "-o", options, "start"], **run)
        if done.returncode != 0:
            log = (folder / "server.log").read_text(errors="replace")[-1500:] if (folder / "server.log").exists() else ""
            raise ConfigError(f"PostgreSQL did not start: {done.stderr.strip()[-500:]} {log}")
    except BaseException:
        server.stop()
        raise
    return server
