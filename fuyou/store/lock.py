"""One writer per store: an exclusive lock on `<store>/.fuyou-lock`, held by every command that
writes or exports a store for as long as it runs.

`fcntl.flock` locks belong to the open file: the kernel drops them when the process exits in any
way (kill -9 included), so a dead holder's lock is free and the next run simply takes it; the file
holds the holder's PID for the message a second process gets.
"""
from __future__ import annotations

import fcntl
import os
from typing import Optional

from .manifest import StoreError

LOCK_FILE = ".fuyou-lock"


class StoreLock:
    """`shared`: a reader that only needs the store unchanged (LoRA runs on a frozen base): many
    shared holders at once, none beside a writer."""

    def __init__(self, store: str, shared: bool = False):
        self.shared = shared
        self.store = os.path.abspath(store)
        self.path = os.path.join(self.store, LOCK_FILE)
        self._fd: Optional[int] = None
        self._created = False

    def __enter__(self) -> "StoreLock":
        if os.path.islink(self.store) or (os.path.exists(self.store) and not os.path.isdir(self.store)):
            raise StoreError(f"store path {self.store} is not a directory; pass a directory (it will be created)")
        self._created = not os.path.exists(self.store)
        os.makedirs(self.store, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(f"store {self.store} is in use by process {holder}; wait for it to finish (or stop it), then run again") from None
        if not self.shared:  # the PID names the writer; readers leave it alone
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is None:
            return False
        if self._created and os.listdir(self.store) == [LOCK_FILE]:
            # This run made the directory and wrote nothing else (it stopped before its import):
            # leave nothing behind.
            os.unlink(self.path)
            os.rmdir(self.store)
        os.close(self._fd)  # releases the lock; an existing store keeps the file
        self._fd = None
        return False
