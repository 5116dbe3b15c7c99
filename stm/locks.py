"""One run per folder: a lock file with a heartbeat, for local disks and object stores (the
preprocessing job holds ``OUT/_preprocess.lock`` while it writes ``OUT``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

import pyarrow.fs as pafs

from stm import storage
from stm.config import UsageError

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0  # how often a run refreshes its lock's heartbeat
STALE_SECONDS = 300.0  # a lock whose heartbeat is older than this is taken over


def first_line(e: BaseException) -> str:
    """The first non-blank line of an error's message (its type when it has none)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """A lock file (``path``; ``uri`` names it in messages, ``flag`` the folder's option and
    ``job`` the job) saying which run works on a folder (JSON: host, pid, started, a heartbeat
    refreshed every ``HEARTBEAT_SECONDS`` by a daemon thread, a random token).

    ``acquire`` refuses (``UsageError``) while another run holds a live lock. A lock is stale,
    and taken over with a warning, when its host is this host and its pid is not running, or
    its heartbeat is older than ``STALE_SECONDS``. Local filesystems create the lock
    exclusively (written to a temp file, then hard-linked to the lock's name: the link fails
    when the lock exists, and a lock is never seen half written); object stores: best effort
    (write it, then read it back and compare the token).
    """

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str, flag: str, job: str) -> None:
        self.fs, self.path, self.uri, self.flag, self.job = fs, path, uri, flag, job
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.token = uuid.uuid4().hex
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now_utc(),
            "heartbeat": now_utc(),
            "token": self.token,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # reading and judging a lock
    def _read(self) -> tuple[bytes, dict] | None:
        """The lock's bytes and content, or None when there is no lock. A lock that is not
        valid JSON (edited by hand, or still being written where there are no hard links)
        counts as held since its modification time."""
        if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return None
        try:
            with self.fs.open_input_stream(self.path) as f:
                raw = f.read()
        except FileNotFoundError:  # deleted meanwhile
            return None
        try:
            info = json.loads(raw.decode())
            if not isinstance(info, dict):
                raise ValueError("not an object")
        except ValueError:
            mtime = self.fs.get_file_info(self.path).mtime
            when = mtime.astimezone(timezone.utc).isoformat(timespec="seconds") if mtime else ""
            info = {"host": "?", "pid": None, "started": when, "heartbeat": when}
        return raw, info

    def _stale(self, info: dict) -> str | None:
        """Why a lock is stale, or None when it is live."""
        try:
            beat = datetime.fromisoformat(str(info.get("heartbeat"))).timestamp()
        except ValueError:
            beat = 0.0
        age = time.time() - beat
        if age > STALE_SECONDS:
            return f"its heartbeat is {age:.0f} s old"
        pid = info.get("pid")
        if info.get("host") == self.info["host"] and isinstance(pid, int) and not pid_alive(pid):
            return f"its pid {pid} is not running on this host"
        return None

    # taking it
    def acquire(self) -> None:
        """Take the lock (``UsageError`` while another run holds it) and start the heartbeat."""
        for _ in range(5):
            held = self._read()
            if held is not None:
                raw, info = held
                why = self._stale(info)
                if why is None:
                    raise UsageError(
                        f"another {self.job} run works on this {self.flag} (host "
                        f"{info.get('host')}, pid {info.get('pid')}, since {info.get('started')}): "
                        f"wait for it to end, or delete {self.uri} if that run is dead"
                    )
                logger.warning(
                    "taking over %s of a dead run (host %s, pid %s, since %s): %s",
                    self.uri, info.get("host"), info.get("pid"), info.get("started"), why,
                )  # fmt: skip
                if not self._remove(raw):
                    continue  # it changed meanwhile: judge it again
            if self._create():
                self._thread = threading.Thread(
                    target=self._beat, name="run-lock-heartbeat", daemon=True
                )
                self._thread.start()
                return
        raise UsageError(f"could not take {self.uri}: other runs keep taking it")

    def _content(self) -> bytes:
        return (json.dumps(self.info, indent=2) + "\n").encode()

    def _create(self) -> bool:
        """Create the lock unless one exists; whether this run now holds it."""
        if not self.local:
            storage.write_bytes_atomic(self.fs, self.path, self._content())
            time.sleep(0.5)  # let a concurrent writer's lock land, then see whose survived
            held = self._read()
            return held is not None and held[1].get("token") == self.token
        tmp = posixpath.join(posixpath.dirname(self.path), f"{storage.TMP_PREFIX}{self.token}.lock")
        with open(tmp, "wb") as f:
            f.write(self._content())
        try:
            os.link(tmp, self.path)  # fails when the lock exists: O_EXCL, with its content
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: O_EXCL (briefly empty)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._content())
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _remove(self, raw: bytes) -> bool:
        """Remove a stale lock whose bytes are ``raw``; False when it changed or went meanwhile
        (another run took it over first)."""
        if not self.local:
            held = self._read()
            if held is None or held[0] != raw:
                return False
            self.fs.delete_file(self.path)
            return True
        aside = posixpath.join(
            posixpath.dirname(self.path), f"{storage.TMP_PREFIX}{self.token}.stale"
        )
        try:
            os.rename(self.path, aside)  # one run wins the rename
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                if f.read() == raw:
                    return True
            with contextlib.suppress(FileExistsError):  # another run's fresh lock: put it back
                os.link(aside, self.path)
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)

    # holding it
    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                held = self._read()
                if held is None or held[1].get("token") != self.token:
                    logger.warning("%s was taken over by another run", self.uri)
                    return
                self.info["heartbeat"] = now_utc()
                storage.write_bytes_atomic(self.fs, self.path, self._content())
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried
                logger.warning("could not refresh %s: %s", self.uri, first_line(e))

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still this run's (never raises)."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=10)
        self._thread = None
        try:
            held = self._read()
            if held is not None and held[1].get("token") == self.token:
                self.fs.delete_file(self.path)
            else:
                logger.warning("%s is no longer this run's: left as it is", self.uri)
        except Exception as e:  # noqa: BLE001 - never hide the run's own outcome
            logger.warning("could not delete %s: %s", self.uri, first_line(e))
