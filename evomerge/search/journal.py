"""The run's journal file: written by one driver, read by everyone else.

:class:`DriverJournalFile` holds an exclusive lock (``<journal>.writer``) for the driver's
lifetime and appends whole records with one ``write`` each, without optuna's per-write lock
file and fsync; :class:`JournalFileReader` is optuna's reader that names the file and the record
when a line in the middle is corrupt. A full disk (``ENOSPC``, ``EDQUOT``) while appending raises
:class:`DiskFullError`; the partial record is cut off again, so the journal stays whole and
``--resume`` continues from it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import optuna
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend

LOCK_SUFFIX = ".writer"  # optuna's own per-write lock is "<journal>.lock": a different file
_CHUNK = 1 << 20


class JournalLockedError(RuntimeError):
    """Another process (an ``evomerge search`` driver) holds the journal's writer lock."""


class DiskFullError(RuntimeError):
    """No space left (or over quota) on the file system of ``path`` while writing it.

    ``then`` says how to carry on once there is space again. ``errno`` and ``filename`` are
    those of the ``OSError`` it stands for.
    """

    ERRNOS = (errno.ENOSPC, errno.EDQUOT)

    def __init__(
        self, path: str | Path | None, *, then: str = "run `evomerge search JOB --resume`"
    ) -> None:
        self.errno = errno.ENOSPC
        self.filename = path
        what = f"cannot write {path}" if path else "a write failed"
        super().__init__(
            f"the disk is full ({what}); free space on it, then {then} to continue: "
            "everything written before is kept"
        )


def corrupt_record(path: str | Path, number: int, err: json.JSONDecodeError) -> ValueError:
    """The error for an invalid line ``number`` (1-based) in the middle of a journal."""
    keep, what = number - 1, f"{err.msg.removesuffix(' at')} at column {err.colno}"
    return ValueError(
        f"{path}: record {number} is not valid JSON ({what}); the journal is corrupt from line "
        f"{number} on: repair that line, or keep the {keep} records before it "
        f"(`head -n {keep} {path} > repaired.journal`), losing those after it"
    )


class DriverJournalFile(BaseJournalBackend):
    """optuna's journal file format, written by one process: the search driver.

    Holds ``fcntl.flock(LOCK_EX)`` on ``<journal>.writer`` until :meth:`close` (or the process
    dies), so a second writer fails with :class:`JournalLockedError`. Each append is one
    ``write`` to a file opened with ``O_APPEND`` (whole lines, visible to readers at once and
    kept by the OS if the process is killed); ``fsync=True`` also fsyncs each append, which
    only matters for an OS crash or power loss. Reads parse only the bytes appended since the
    last read. After :meth:`close` it reads and writes as optuna's locking backend does.

    >>> storage = JournalStorage(DriverJournalFile("/tmp/x.journal"))  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock: IO[str] | None = _acquire_writer_lock(self.path)
        self._file: IO[bytes] | None = None
        try:
            self._file = open(self.path, "a+b", buffering=0)  # noqa: SIM115 - closed in close()
            self._drop_torn_tail()
        except BaseException:
            self.close()
            raise
        self._pos = 0  # byte offset just after the last complete line read
        self._count = 0  # number of lines before _pos
        self._closed: JournalFileBackend | None = None
        self._buffer: list[dict[str, Any]] | None = None  # appends held by batch()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the appends made inside the block and write them in one ``write`` at its end
        (the driver's mirror writes each batch of finished trials so). Reads inside the block
        do not see them; nothing is written if the block raises."""
        self._buffer = []
        try:
            yield
            logs, self._buffer = self._buffer, None
            if logs:
                self.append_logs(logs)
        finally:
            self._buffer = None

    def _drop_torn_tail(self) -> None:
        """A driver killed inside ``write`` can leave a partial last line: it was never
        acknowledged, so cut it, or the next append would glue onto it and corrupt the line."""
        assert self._file is not None
        fd = self._file.fileno()
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        keep = size
        while keep > 0:
            start = max(0, keep - _CHUNK)
            nl = os.pread(fd, keep - start, start).rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            keep = start
        optuna.logging.get_logger(__name__).warning(
            f"{self.path}: dropping a partly written last record ({size - keep} bytes) "
            "left by a driver that was killed while writing it"
        )
        os.truncate(fd, keep)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        """Logs numbered ``log_number_from`` and later; a partial last line is left unread."""
        if self._closed is not None:
            return iter(self._closed.read_logs(log_number_from))
        return self._read(log_number_from)

    def _read(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        assert self._file is not None
        fd = self._file.fileno()
        pos, number = (self._pos, self._count) if log_number_from >= self._count else (0, 0)
        for line, end in _complete_lines(fd, pos, os.fstat(fd).st_size):
            wanted = number >= log_number_from
            log = self._parse(line, number) if wanted else None
            number += 1
            if number > self._count:
                self._pos, self._count = end, number
            if log is not None:
                yield log

    def _parse(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            log: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError as err:
            raise corrupt_record(self.path, number + 1, err) from None
        return log

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Append ``logs`` as JSON lines in one write (optuna's exact format)."""
        if self._buffer is not None:
            self._buffer.extend(logs)
            return None
        if self._closed is not None:
            return self._closed.append_logs(logs)
        assert self._file is not None
        fd = self._file.fileno()
        data = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
        view = memoryview(data.encode("utf-8"))
        start = os.fstat(fd).st_size  # the end: this process is the only writer
        try:
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        except OSError as err:
            if err.errno not in DiskFullError.ERRNOS:
                raise
            self._cut_back(start)
            raise DiskFullError(self.path) from None

    def _cut_back(self, size: int) -> None:
        """Remove what a failed append wrote after ``size``: never acknowledged, and a torn
        line in the middle would make the journal unreadable once more lines follow."""
        assert self._file is not None
        fd = self._file.fileno()
        if os.fstat(fd).st_size > size:
            os.truncate(fd, size)

    def close(self) -> None:
        """Release the writer lock; later calls go through optuna's locking backend."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._closed = JournalFileBackend(str(self.path))
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


class JournalFileReader(JournalFileBackend):
    """optuna's ``JournalFileBackend`` whose error for a corrupt line names the file, the record
    and the fix (optuna's own says e.g. ``Invalid control character at: line 1 column 138``)."""

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        try:
            yield from super().read_logs(log_number_from)
        except ValueError as err:  # json.JSONDecodeError or optuna's "Invalid log format."
            found = _first_corrupt_line(Path(self._file_path))
            if found is None:
                raise
            raise found from err


def _first_corrupt_line(path: Path) -> ValueError | None:
    with open(path, "rb") as f:
        fd = f.fileno()
        for number, (line, _) in enumerate(_complete_lines(fd, 0, os.fstat(fd).st_size), 1):
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return corrupt_record(path, number, err)
    return None


def _complete_lines(fd: int, pos: int, size: int) -> Iterator[tuple[bytes, int]]:
    """(line, offset after it) for each newline-terminated line in bytes [pos, size)."""
    chunk = _CHUNK
    while pos < size:
        data = os.pread(fd, min(chunk, size - pos), pos)
        last = data.rfind(b"\n")
        if last < 0:
            if pos + len(data) >= size:
                return  # a partial last line: being written, or torn
            chunk *= 2  # one line longer than the chunk
            continue
        start = 0
        while start <= last:
            nl = data.index(b"\n", start)
            yield data[start:nl], pos + nl + 1
            start = nl + 1
        pos += last + 1


def _acquire_writer_lock(journal: Path) -> IO[str]:
    journal.parent.mkdir(parents=True, exist_ok=True)
    f = open(journal.with_name(journal.name + LOCK_SUFFIX), "a+")  # noqa: SIM115
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise JournalLockedError(
            f"{journal} is being written by another evomerge driver ({holder}); "
            "wait for that search to finish or stop it, then run again with --resume"
        ) from None
    f.truncate(0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n")
    f.flush()
    return f
