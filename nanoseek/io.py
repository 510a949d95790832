"""The one way nanoseek writes files: atomically (temp file or dir + rename), with the modes the umask allows.

A reader never sees half a file or half a model directory, and what we write is as readable as any file the
user's shell would create: `mkstemp`/`mkdtemp` make private 0600/0700 entries, so every temp entry is given
the umask's mode (0644 / 0755 under umask 022) before it is renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that takes a file name (safetensors, savefig); on success
    it gets the umask's mode and replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (fsynced temp file + rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def temp_dir_beside(path: str | os.PathLike, prefix: str | None = None) -> Path:
    """A new empty directory next to `path` (same file system, so `replace_dir` is a rename), with the umask's
    mode; fill it, then `replace_dir(tmp, path)`. `prefix` (default `.NAME.tmp-`) lets a caller find its own
    leftovers after a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix or f".{path.name}.tmp-"))
    os.chmod(tmp, dir_mode())
    return tmp


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move directory src to dst, replacing dst: at every instant either the old or the new dir is complete."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextmanager
def atomic_dir(path: str | os.PathLike, prefix: str | None = None) -> Iterator[Path]:
    """Yield a temp directory to fill; on success it replaces `path` whole, on error it is removed."""
    tmp = temp_dir_beside(path, prefix)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
