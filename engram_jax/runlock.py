"""One training run per workdir: an advisory lock on `<workdir>/train.lock`.

Two runs in one workdir would interleave their rows in metrics.jsonl and mix their checkpoints, so
the second one must refuse to start. The lock is `fcntl.flock` on a file in the workdir, and the
holder writes who it is (pid, host, start time, command line) into that file so the refusal can
name it. The kernel drops a flock when its process exits, however it exits (`kill -9` included),
so a lock left behind by a dead run never blocks the next one; the file itself stays, and only
its lock state matters. A spawned worker process (grain's `mp_prefetch`) does not inherit the
descriptor: Python opens it non-inheritable.

In a multi-host run only process 0 takes the lock (one lock per run); the trainer tells the other
processes whether it got it.

On NFS, `flock` is emulated with byte-range locks that the server arbitrates (Linux >= 2.6.12), so
runs on different hosts exclude each other too; some other network filesystems ignore locks.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Optional

LOCK_FILE = "train.lock"


class WorkdirBusyError(RuntimeError):
  """Another process holds the workdir's lock: a training run is already using it."""


def _describe(holder: dict) -> str:
  if not holder:
    return "a process that has not written its details yet"
  where = f"process {holder.get('pid')} on host {holder.get('host')}"
  extra = []
  if holder.get("started"):
    extra.append(f"started {holder['started']}")
  if holder.get("command"):
    extra.append(f"command: {holder['command']}")
  return where + (f" ({'; '.join(extra)})" if extra else "")


class WorkdirLock:
  """`acquire()` takes `<workdir>/train.lock` or raises WorkdirBusyError naming the holder;
  `release()` (or leaving the `with` block) lets it go. The workdir must exist."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: Optional[int] = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def holder(self) -> dict:
    """What the current holder wrote into the lock file ({} if nothing readable)."""
    try:
      with open(self.path, encoding="utf-8") as f:
        return json.loads(f.read() or "{}")
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "WorkdirLock":
    if self._fd is not None:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      holder = self.holder()
      pid = holder.get("pid")
      stop = (f"stop it (`kill {pid}` on {holder.get('host')} saves a checkpoint first)" if pid else "stop it")
      raise WorkdirBusyError(
          f"workdir {self.workdir} is in use by another training run: {_describe(holder)}. Two runs in one "
          f"workdir would interleave their metrics and mix their checkpoints, so this one did not start. Wait "
          f"for that run to finish, {stop}, or pass another --workdir.") from None
    except BaseException:
      os.close(fd)
      raise
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
    self._fd = fd
    return self

  def release(self):
    """Unlock (the file stays: deleting it could let two later runs lock two different files)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
