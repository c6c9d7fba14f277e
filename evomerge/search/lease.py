"""One driver per study in a database: a lease held for the driver's lifetime.

:meth:`StudyLease.acquire` picks the lease by the storage URL (:func:`supports_lease`); a
second driver on the same study gets :class:`JournalLockedError` with the journal's refusal.

- **PostgreSQL**: a session advisory lock (below).
- **SQLite** (a file): ``flock`` on ``<db>.<key>.writer`` next to the database, one file per
  study (the journal's lock, :mod:`evomerge.search.journal`); the OS drops it when the
  process dies, ``kill -9`` included. An in-memory database (``sqlite://``) takes none.
- **Redis**: a key ``evomerge:driver:<study>`` set with ``SET NX PX`` and renewed every few
  seconds by a thread; a killed driver's key expires after :data:`REDIS_TTL_S`.

A journal file has its ``flock`` (:mod:`evomerge.search.journal`); a study in PostgreSQL gets
``pg_try_advisory_lock`` on a key derived from the study name, taken on a connection of its own
that stays open until :meth:`StudyLease.release`. The server drops the lock when that
connection ends, so a driver killed with ``kill -9`` frees its study at once (one whose host
died: within about a minute, by the TCP keepalives set on that session) without a manual
unlock, and ``--resume`` fails the trials it left RUNNING knowing that no live driver owns
them: the lease is the heartbeat. The holder names itself in its
connection's ``application_name``, which a refused driver reads back from ``pg_stat_activity``.

A lease can be lost while its driver runs: a PostgreSQL restart (or a cut lease connection)
ends the session and its lock; a Redis key not renewed for :data:`REDIS_TTL_S` expires. The
mirror writer (:mod:`evomerge.search.mirror`) calls :meth:`StudyLease.check` before each batch,
and a daemon thread checks every :data:`WATCH_S` seconds: a PostgreSQL lease reconnects with
backoff and takes its lock again (no batch is written until it holds it); a lock or key another
driver took meanwhile raises :class:`LeaseLostError`, which stops the search in one line.

>>> lease = StudyLease.acquire("postgresql://u@127.0.0.1/db", "my-study")  # doctest: +SKIP
>>> lease.release()  # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from evomerge.search.journal import JournalLockedError

_NAMESPACE = "evomerge:driver:"
_KEEPALIVE = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}
_POSTGRES = ("postgresql://", "postgresql+psycopg2://", "postgresql+psycopg://", "postgres://")
_REDIS = ("redis://", "rediss://")
REDIS_TTL_S = 15.0  # a killed driver's Redis lease is free after this long
WATCH_S = 2.0  # how often a PostgreSQL lease's thread checks its connection
CONNECT_TIMEOUT_S = 5  # a lease (re)connection to an unreachable host gives up after this

log = logging.getLogger(__name__)


class LeaseLostError(JournalLockedError):
    """This driver lost its study's lease (another driver holds it now): it stops writing."""


def lease_key(study: str) -> int:
    """The advisory-lock key (a signed 64-bit int) of ``study``: stable across processes."""
    digest = hashlib.blake2b((_NAMESPACE + study).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def supports_lease(url: str) -> bool:
    """A driver of a study at ``url`` takes a :class:`StudyLease` (PostgreSQL, SQLite, Redis)."""
    return url.startswith((*_POSTGRES, *_REDIS)) or _is_sqlite(url)


def _is_sqlite(url: str) -> bool:
    return url.startswith(("sqlite://", "sqlite+"))


def _me() -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"evomerge driver pid {os.getpid()} on {socket.gethostname()} since {stamp}"


def _refusal(study: str, url: str, holder: str | None) -> JournalLockedError:
    holder = (holder or "another process").removeprefix("evomerge driver ")
    return JournalLockedError(
        f"study {study!r} in {_safe(url)} is being written by another evomerge driver "
        f"({holder}); wait for that search to finish or stop it, then run again with --resume"
    )


def _taken_over(study: str, url: str, holder: str | None, while_: str) -> LeaseLostError:
    holder = (holder or "another process").removeprefix("evomerge driver ")
    return LeaseLostError(
        f"study {study!r} in {_safe(url)} is now driven by another evomerge driver ({holder}), "
        f"which took its lease while {while_}; this driver stopped and wrote nothing to it "
        "since; let that search finish, or stop it, then run again with --resume"
    )


class StudyLease:
    """The driver lease of one study; :meth:`acquire` picks its kind by the URL's scheme."""

    url: str
    study: str

    @classmethod
    def acquire(cls, url: str, study: str) -> StudyLease:
        """Take the lease of ``study`` or raise :class:`JournalLockedError` naming the holder."""
        if _is_sqlite(url):
            return FileLease.take(url, study)
        if url.startswith(_REDIS):
            return RedisLease.take(url, study)
        return AdvisoryLease.take(url, study)

    def check(self) -> None:
        """Before a write: return once the lease is held (a ``flock`` always is); raise
        :class:`LeaseLostError` if another driver holds it now, or the storage's error while
        it cannot tell (the caller retries, as for any write in an outage)."""

    def release(self) -> None:
        raise NotImplementedError


class AdvisoryLease(StudyLease):
    """PostgreSQL: the advisory lock of one study, held on its own autocommit connection.

    :meth:`check` (the mirror writer, before each batch) and a daemon thread (every
    :data:`WATCH_S` s, so the lock is back within seconds of a restart even while no trial
    finishes) run ``SELECT 1`` on that connection; a lost one is replaced and the lock taken
    again, or :class:`LeaseLostError` names the driver that took it meanwhile."""

    def __init__(self, conn: Any, url: str, study: str, me: str) -> None:
        self._conn: Any | None = conn
        self.url, self.study, self.me = url, study, me  # me: its application_name
        self._lock = threading.Lock()  # the connection: the writer's check and the thread's
        self._lost: LeaseLostError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="evomerge-lease")
        self._thread.start()

    @classmethod
    def take(cls, url: str, study: str) -> AdvisoryLease:
        me = _me()
        holder = _lock_session(url, study, me)
        if isinstance(holder, str | None):
            raise _refusal(study, url, holder)
        return cls(holder, url, study, me)

    def check(self) -> None:
        with self._lock:
            if self._lost is not None:
                raise self._lost
            if self._stop.is_set() or self._alive():
                return
            got = _lock_session(self.url, self.study, self.me)  # raises while the server is down
            if isinstance(got, str | None):
                self._lost = _taken_over(self.study, self.url, got,
                                         "this driver's connection to the database was down")
                log.error(str(self._lost))
                raise self._lost
            self._conn = got
        log.warning(f"study {self.study!r}: the driver lease is held again after the lease "
                    "connection was lost (a database restart?)")

    def _alive(self) -> bool:
        """The lease connection answers (so its session, and the lock, live); drops it if not."""
        from sqlalchemy import text

        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
                return True
            except Exception:  # the session ended (a restart, a cut): its lock went with it
                _close(self._conn)
                self._conn = None
        return False

    def _watch(self) -> None:
        fails = 0
        while not self._stop.wait(WATCH_S if fails == 0 else min(5.0, 0.25 * 2**fails)):
            try:
                self.check()
                fails = 0
            except LeaseLostError:
                return
            except Exception:  # the server is still down: try again soon, backing off
                fails = min(fails + 1, 5)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=CONNECT_TIMEOUT_S + 1)
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            _close(conn)  # ends the session: the server releases the lock with it


def _lock_session(url: str, study: str, me: str) -> Any:
    """A new autocommit connection holding ``study``'s advisory lock, named ``me``;
    or, where another session holds the lock, that session's ``application_name`` (or None)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, poolclass=_null_pool(), isolation_level="AUTOCOMMIT",
                           connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        conn = engine.connect()
    except BaseException:
        engine.dispose()
        raise
    try:
        conn.execute(text("SELECT set_config('application_name', :me, false)"), {"me": me})
        for name, value in _KEEPALIVE.items():  # the server notices a dead host in ~1 min
            conn.execute(text("SELECT set_config(:n, :v, false)"), {"n": name, "v": value})
        got = conn.execute(
            text("SELECT pg_try_advisory_lock(:k)"), {"k": lease_key(study)}
        ).scalar()
        if got:
            return conn
        holder = lease_holder(conn, study)
    except BaseException:
        _close(conn)
        raise
    _close(conn)
    return holder


def _close(conn: Any) -> None:
    try:
        conn.close()
    finally:
        conn.engine.dispose()


class FileLease(StudyLease):
    """SQLite: ``flock`` on a file of its own next to the database, one per study; the
    holder's line in it names the refused driver's rival. The file is left in place (removing
    a lock file races with the next driver opening it)."""

    def __init__(self, file: IO[str] | None, url: str, study: str) -> None:
        self._file = file
        self.url, self.study = url, study

    @classmethod
    def take(cls, url: str, study: str) -> FileLease:
        path = sqlite_lock_path(url, study)
        if path is None:  # an in-memory database: no other process can open it
            return cls(None, url, study)
        f = open(path, "a+")  # noqa: SIM115 - closed in release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise _refusal(study, url, holder) from None
        f.truncate(0)
        f.write(f"{_me()} (study {study!r})\n")
        f.flush()
        return cls(f, url, study)

    def release(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def sqlite_lock_path(url: str, study: str) -> Path | None:
    """The lock file of ``study`` in the SQLite database at ``url``; None in memory."""
    from sqlalchemy.engine import make_url

    db = make_url(url).database
    if not db or db == ":memory:" or "mode=memory" in url:
        return None
    db = db.removeprefix("file:")
    key = lease_key(study) & 0xFFFFFFFFFFFFFFFF
    return Path(f"{db}.{key:016x}.writer")


class RedisLease(StudyLease):
    """Redis: the key ``evomerge:driver:<study>`` holds the holder's line, set only if absent
    (``SET NX``) with an expiry of :data:`REDIS_TTL_S`, renewed by a daemon thread every third
    of it while the key still holds this driver's token. A driver killed with ``kill -9``
    frees its study when the key expires. :meth:`check` renews it too (the mirror writer,
    before each batch, so a batch never starts on a key about to expire); a renewal that finds
    the key gone or another driver's raises :class:`LeaseLostError`: the driver stops."""

    def __init__(self, client: Any, url: str, study: str, token: str) -> None:
        self._client: Any | None = client
        self.url, self.study, self.token = url, study, token
        self._lost: LeaseLostError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="evomerge-lease")
        self._thread.start()

    @classmethod
    def take(cls, url: str, study: str) -> RedisLease:
        import redis  # optuna's JournalRedisBackend needs it too

        client = redis.Redis.from_url(url)
        token = f"{_me()} [{uuid.uuid4().hex}]"
        ttl_ms = int(REDIS_TTL_S * 1000)
        if not client.set(_NAMESPACE + study, token, nx=True, px=ttl_ms):
            holder = client.get(_NAMESPACE + study)
            client.close()
            if isinstance(holder, bytes):
                holder = holder.decode(errors="replace")
            text = holder.rsplit(" [", 1)[0] if holder else None
            raise _refusal(study, url, text)
        return cls(client, url, study, token)

    # renew / delete only while the key still holds our token (another driver's after expiry)
    _RENEW = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', "
        "KEYS[1], ARGV[2]) else return 0 end"
    )
    _DELETE = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1])"
        " else return 0 end"
    )

    def check(self) -> None:
        import redis

        if self._lost is not None:
            raise self._lost
        client, key = self._client, _NAMESPACE + self.study
        if client is None:
            return
        try:
            if client.eval(self._RENEW, 1, key, self.token, int(REDIS_TTL_S * 1000)):
                return
            holder = client.get(key)
        except redis.exceptions.ConnectionError as err:  # the caller retries: still ours?
            raise ConnectionError(f"Redis at {_safe(self.url)} does not answer: {err}") from err
        self._lost = self._lost or self._why_lost(holder)
        log.error(str(self._lost))
        raise self._lost

    def _why_lost(self, holder: bytes | str | None) -> LeaseLostError:
        if isinstance(holder, bytes):
            holder = holder.decode(errors="replace")
        if holder:
            why = "this driver could not renew it"
            return _taken_over(self.study, self.url, holder.rsplit(" [", 1)[0], why)
        return LeaseLostError(
            f"the driver lease of study {self.study!r} in {_safe(self.url)} expired (its key "
            f"{_NAMESPACE + self.study} was gone at a renewal: Redis lost it, or this driver "
            f"could not reach Redis for {REDIS_TTL_S:.0f} s), so another driver may have "
            "written the study since; this driver stopped and wrote nothing to it since; check "
            "that no other search runs on it, then run again with --resume"
        )

    def _renew(self) -> None:
        while not self._stop.wait(REDIS_TTL_S / 3):
            try:
                self.check()
            except LeaseLostError:
                return  # nothing to renew: the writer refuses to write (check() raises)
            except Exception:  # a Redis hiccup: try again at the next tick
                continue

    def release(self) -> None:
        self._stop.set()
        if self._client is not None:
            client, self._client = self._client, None
            self._thread.join(timeout=5)
            try:
                client.eval(self._DELETE, 1, _NAMESPACE + self.study, self.token)
            finally:
                client.close()


def guard_connections(engine: Any, lease: StudyLease) -> None:
    """Every new connection of the storage's ``engine`` first runs :meth:`StudyLease.check`:
    after a database restart not one write reaches the study before the lease is held again,
    though optuna retries a failed write on a new connection within one call (the mirror's
    check before each batch alone would let the rest of that batch through)."""
    from sqlalchemy import event

    event.listen(engine, "connect", lambda *_: lease.check())


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
