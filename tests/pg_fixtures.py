"""A real PostgreSQL server for the session: Debian's ``postgresql`` binaries, a throwaway
cluster in a temp dir, listening on 127.0.0.1 only (no Unix socket outside that dir).

Import the fixture into a test module (``from tests.pg_fixtures import postgres_url  # noqa``);
``postgres_server`` (import both) can stop and start the server mid-test.
A missing PostgreSQL fails the tests that use it, it does not skip them: ``.ci/run`` installs it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

USER = "evomerge"


def pg_bin(name: str) -> str:
    """``name`` (``initdb``, ``pg_ctl``) from PATH or Debian's ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.fail(f"PostgreSQL's {name} is not installed: apt-get install -y postgresql")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    """postgres refuses to run as root: run as the ``postgres`` system user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(_as_postgres(cmd), capture_output=True, text=True, timeout=120)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}")


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1: :meth:`stop` and :meth:`start` it again on
    the same port and data (a database restart in the middle of a search)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
        self.data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self.port = free_port()
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/{USER}"
        _run([pg_bin("initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8"])
        self.start()
        _run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, USER])

    def start(self) -> None:
        opts = f"-k {self.root} -h 127.0.0.1 -p {self.port} -c fsync=off -c max_connections=100"
        _run([pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"),
              "-w", "start"])

    def stop(self, mode: str = "fast") -> None:
        """``fast``: the server ends every session (clients see their connection closed)."""
        _run([pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


_SERVERS: dict[str, PostgresServer] = {}


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``postgresql://evomerge@127.0.0.1:PORT/evomerge`` on a server removed after the session."""
    import psycopg  # noqa: F401 - SQLAlchemy 2.1's postgresql:// driver; missing: tests fail

    server = PostgresServer()
    _SERVERS[server.url] = server
    try:
        yield server.url
    finally:
        _SERVERS.pop(server.url)
        server.remove()


@pytest.fixture(scope="session")
def postgres_server(postgres_url: str) -> PostgresServer:
    """The :class:`PostgresServer` behind ``postgres_url`` (import both fixtures); a test that
    stops it starts it again."""
    return _SERVERS[postgres_url]
