"""An exclusive lock on a quantizer's output, so two runs never write one directory.

Two ``--resume`` runs on the same OUT would both redo units in OUT.partial/ and
one could publish bytes the other half-wrote. The lock is ``fcntl.flock`` on
``OUT.lock`` beside ``OUT.partial``: the kernel drops it when the holder exits
(even on kill -9), so a stale file never blocks anyone. The holder writes its
pid and host into the file, so a loser can say who holds it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path


class OutputLocked(ValueError):
    """Another process holds the output's lock (one line naming it)."""


def lock_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".lock")


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {int(info['pid'])} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded its pid"


class OutputLock:
    """Context manager: hold ``OUT.lock`` exclusively, or raise OutputLocked at once.

    The file is removed on release while still locked. A process that opened
    the old file meanwhile would lock an unlinked inode, so after locking the
    path is re-checked to be the same file, and the attempt repeated if not.
    """

    def __init__(self, out_dir: Path):
        self.out_dir, self.path, self.fd = out_dir, lock_path(out_dir), None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputLocked(f"{self.out_dir}: another quantize run is writing this "
                                   f"output ({_holder(self.path)} holds {self.path}); wait "
                                   f"for it to finish, or stop it and rerun with --resume"
                                   ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
