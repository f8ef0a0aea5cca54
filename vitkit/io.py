"""Small file helpers every layer may use (a leaf module: it imports nothing of vitkit but errors)."""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from vitkit.errors import VitkitError

_UMASK = os.umask(0o022)  # read the process umask (the only way is to set it) and put it back
os.umask(_UMASK)


def _write_errno(e: BaseException | None) -> int | None:
    """The OS error behind a failed write. torch.save reports a full disk as a RuntimeError whose context is
    the OSError (when it writes through a Python file); safetensors' Rust writer only says `os error 28`."""
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"os error (\d+)", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Run `write(tmp_path)` then move the result onto `path` atomically, surviving a kill at any point.

    A full disk (or any other OS error) leaves `path` as it was and raises a one-line VitkitError saying so.
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        # mkstemp makes it owner-only (and safetensors' writer recreates the file as such): a checkpoint gets
        # the usual permissions, as any file the user writes
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError, SafetensorError) as e:
        code = _write_errno(e)
        if code is None and not isinstance(e, OSError):  # not an I/O failure: a bug, not the user's to fix
            raise
        if code in (errno.ENOSPC, errno.EDQUOT):
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)  # before measuring what is free
            free = shutil.disk_usage(path.parent).free / 2**20 if path.parent.is_dir() else 0.0
            raise VitkitError(f"the disk is full: could not write {path} ({free:.0f} MiB free in {path.parent}); "
                              f"the previous file is intact: free space, then resume (--resume)") from e
        raise VitkitError(f"could not write {path}: {os.strerror(code) if code else e}; the previous file, if "
                          f"any, is intact") from e
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
