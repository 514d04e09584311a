"""Fixtures of the store tests: every I/O backend that can run here, and a small full file system."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from fuyou.store import backends


def runnable_backends() -> list[str]:
    """Backends this machine can run ("python" always; "threads"/"uring" with the C++ engine)."""
    names = []
    for name in ("python", "threads", "uring"):
        try:
            backends.get_backend(name)
        except (ValueError, RuntimeError):
            continue
        names.append(name)
    return names


@pytest.fixture(params=runnable_backends())
def backend_name(request) -> str:
    return request.param


def _run(*cmd) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def small_fs():
    """A directory on a ~1-8 MiB file system: a loop-mounted ext4 image (O_DIRECT works), else a
    size-limited tmpfs (O_DIRECT refused: DirectFile falls back to buffered I/O). Skips with the
    reason when neither can be mounted (needs root and mount)."""
    root = tempfile.mkdtemp(prefix="fuyou-smallfs-")
    image, mnt = os.path.join(root, "fs.img"), os.path.join(root, "mnt")
    os.mkdir(mnt)
    kind = None
    if shutil.which("mkfs.ext4") and shutil.which("mount"):
        with open(image, "wb") as f:
            f.truncate(8 << 20)
        if _run("mkfs.ext4", "-q", "-F", image) and _run("mount", "-o", "loop", image, mnt):
            kind = "ext4"
    if kind is None and shutil.which("mount") and _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt):
        kind = "tmpfs"
    if kind is None:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip("cannot mount a small file system here (loop ext4 and tmpfs both refused; needs root)")
    try:
        yield mnt, kind
    finally:
        _run("umount", mnt)
        shutil.rmtree(root, ignore_errors=True)
