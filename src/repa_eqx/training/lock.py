"""One writer per run folder: the trainer holds `RUN/.lock` while it trains.

The lock file says who holds it (host, process id and its start time, command, since when).
A second writer is refused with one line naming the holder. A lock whose process is gone
(killed with SIGKILL, the machine rebooted) is stale: on the same host that is detected
(the process id is unused, or now belongs to a later process) and the lock taken over, with a
message. A holder on another host cannot be checked: the message says which file to delete
once that process is known to be gone. Readers never look at the lock.
"""

import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path

from ..core.errors import RepaError

LOCK = ".lock"


class RunLocked(RepaError, RuntimeError):
    """Another process is writing this run folder."""


def _start_time(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name may hold spaces


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _start_time(pid)
    return started is None or now is None or now == started


def _holder() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_started": _start_time(pid),
        "command": " ".join(sys.argv),
        "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _describe(holder: dict) -> str:
    return (
        f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
        f"({holder.get('command') or 'unknown command'})"
    )


class RunLock:
    """Held by the process that trains `run_dir`; `acquire` returns a message when it took
    over a stale lock, `release` gives it back (only if it is still this process's)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self.me = _holder()

    def _write_new(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as held by an unknown process

    def acquire(self) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._write_new():
            return None
        holder = self._read()
        if holder is None:  # released meanwhile
            if self._write_new():
                return None
            holder = self._read() or {}
        same_host = holder.get("host") == self.me["host"]
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and not _alive(pid, holder.get("pid_started")):
            tmp = self.path.with_name(f"{LOCK}.{self.me['pid']}")
            tmp.write_text(json.dumps(self.me))
            os.replace(tmp, self.path)
            if self._read() != self.me:  # another process took it over at the same moment
                raise RunLocked(f"{self.path.parent} is being written by another process")
            return f"took over the stale lock of {_describe(holder)}: it is no longer running"
        where = "" if same_host else f"; if it is no longer running, delete {self.path}"
        raise RunLocked(
            f"{self.path.parent} is being written by {_describe(holder)}: one run folder "
            f"takes one writer (choose another output.dir){where}"
        )

    def release(self) -> None:
        if self._read() == self.me:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
