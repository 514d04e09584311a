"""What a store directory may hold and where it may be: the checks on a store target, the
confinement of an existing store (no symlinks, so nothing can lead a read, write or delete outside
it), and clearing one for --overwrite."""
from __future__ import annotations

import os
import shutil
import tempfile

from .lock import LOCK_FILE
from .manifest import StoreError, is_dead_import, is_store

STORE_DIRS = ("blocks", "journal", "model", "scratch")


def check_confined(path: str) -> None:
    """Refuse a store that could make fuyou read, write or delete outside it: a symlink among its
    entries, its directories or their files (a store fuyou wrote has none)."""
    for entry in os.scandir(path):
        if entry.is_symlink():
            raise StoreError(f"{entry.path} is a symlink; a fuyou store holds none (it could point outside the store): remove it, or restore the store")
        if entry.name in STORE_DIRS:
            if not entry.is_dir():
                raise StoreError(f"{entry.path} is not a directory; the store is damaged")
            for inner in os.scandir(entry.path):
                if inner.is_symlink() or not inner.is_file(follow_symlinks=False):
                    raise StoreError(f"{inner.path} is not a plain file; a fuyou store holds none: remove it, or restore the store")


def check_store_target(path: str) -> None:
    """Refuse a store path that is a file, not writable, or a non-empty directory that is not a store."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(f"store path {path} is a file; pass a directory (it will be created)")
    parent = path if os.path.isdir(path) else os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:  # os.access says yes to root everywhere; a real probe file tells the truth
        with tempfile.TemporaryFile(dir=parent or "."):
            pass
    except OSError:
        raise StoreError(f"store path {path} is not writable; choose a directory you can write to") from None
    if os.path.isdir(path) and set(os.listdir(path)) - {LOCK_FILE} and not is_store(path) and not is_dead_import(path):
        raise StoreError(f"{path} is a non-empty directory that is not a fuyou store; choose an empty or new directory")


def clear_store(path: str) -> None:
    """Delete a store's contents for --overwrite, all but its lock file (held by this run)."""
    check_confined(path)
    for entry in os.scandir(path):
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
