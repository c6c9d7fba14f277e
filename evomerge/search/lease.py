"""One driver per study in PostgreSQL: a session advisory lock held for the driver's lifetime.

A journal file has its ``flock`` (:mod:`evomerge.search.journal`); a study in PostgreSQL gets
``pg_try_advisory_lock`` on a key derived from the study name, taken on a connection of its own
that stays open until :meth:`StudyLease.release`. The server drops the lock when that
connection ends, so a driver killed with ``kill -9`` frees its study at once (one whose host
died: within about a minute, by the TCP keepalives set on that session) without a manual
unlock, and ``--resume`` fails the trials it left RUNNING knowing that no live driver owns
them: the lease is the heartbeat. The holder names itself in its
connection's ``application_name``, which a refused driver reads back from ``pg_stat_activity``.

>>> lease = StudyLease.acquire("postgresql://u@127.0.0.1/db", "my-study")  # doctest: +SKIP
>>> lease.release()  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

from evomerge.search.journal import JournalLockedError

_NAMESPACE = "evomerge:driver:"
_KEEPALIVE = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10",
              "tcp_keepalives_count": "3"}


def lease_key(study: str) -> int:
    """The advisory-lock key (a signed 64-bit int) of ``study``: stable across processes."""
    digest = hashlib.blake2b((_NAMESPACE + study).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def supports_lease(url: str) -> bool:
    return url.startswith(("postgresql://", "postgresql+psycopg2://", "postgres://"))


class StudyLease:
    """The advisory lock of one study, held on its own autocommit connection."""

    def __init__(self, conn: Any, url: str, study: str) -> None:
        self._conn: Any | None = conn
        self.url, self.study = url, study

    @classmethod
    def acquire(cls, url: str, study: str) -> StudyLease:
        """Take the lease of ``study`` or raise :class:`JournalLockedError` naming the holder."""
        from sqlalchemy import create_engine, text

        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        me = f"evomerge driver pid {os.getpid()} on {socket.gethostname()} since {stamp}"
        engine = create_engine(url, poolclass=_null_pool(), isolation_level="AUTOCOMMIT")
        conn = engine.connect()
        try:
            conn.execute(text("SELECT set_config('application_name', :me, false)"), {"me": me})
            for name, value in _KEEPALIVE.items():  # the server notices a dead host in ~1 min
                conn.execute(text("SELECT set_config(:n, :v, false)"), {"n": name, "v": value})
            got = conn.execute(
                text("SELECT pg_try_advisory_lock(:k)"), {"k": lease_key(study)}
            ).scalar()
            if not got:
                holder = lease_holder(conn, study) or "another process"
                raise JournalLockedError(
                    f"study {study!r} in {_safe(url)} is being written by another evomerge "
                    f"driver ({holder.removeprefix('evomerge driver ')}); wait for that search "
                    "to finish or stop it, then run again with --resume"
                )
        except BaseException:
            conn.close()
            engine.dispose()
            raise
        return cls(conn, url, study)

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()  # ends the session: the server releases the lock with it
            conn.engine.dispose()


def lease_holder(conn: Any, study: str) -> str | None:
    """The ``application_name`` of the session holding ``study``'s lease, or None."""
    from sqlalchemy import text

    key = lease_key(study) & 0xFFFFFFFFFFFFFFFF  # pg_locks splits the key into two oids
    row = conn.execute(
        text(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :hi AND l.objid = :lo"
            " AND l.objsubid = 1"
        ),
        {"hi": key >> 32, "lo": key & 0xFFFFFFFF},
    ).first()
    return row[0] if row and row[0] else None


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool


def _safe(url: str) -> str:
    """``url`` without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
