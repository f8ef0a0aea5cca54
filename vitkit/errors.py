"""User-facing errors. The CLI prints `error: <message>` on one line and exits with code 2.

Raise these (not bare exceptions) for anything the user can fix: a missing folder, a bad key, a checkpoint
for another model. The message says what is wrong and what to do.
"""
from __future__ import annotations

import os
import stat


class VitkitError(Exception):
    """An error the user can fix; the message is shown as is."""


class ConfigError(VitkitError, ValueError):
    """A bad config: unknown key, wrong type or impossible value."""


class WeightsError(VitkitError):
    """Weights that cannot be found, downloaded, parsed or fitted to the model."""


class DataError(VitkitError):
    """A dataset that is missing, empty, or too broken to train on."""


class UnknownModelError(VitkitError, KeyError):
    """A model name that no accepted spelling resolves (`vitkit.models.registry.resolve_model`).

    Also a KeyError, so code written against the registry's old bare KeyError still catches it; `str()` is the
    plain one-line message (KeyError's own would be its quoted repr). `suggestions` are the closest registered
    names, best first, in the spelling family of the name given.
    """

    def __init__(self, message: str, name: str = "", suggestions: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.name = name
        self.suggestions = list(suggestions)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def disk_full_message(e: OSError) -> str | None:
    """The one-line error for a write that failed because the disk (or the quota) is full, else None. Checkpoint
    writes say so themselves (`atomic_write`); this covers the small ones (metrics, logs) that hit it first
    when another process filled the disk."""
    import errno

    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f": could not write {e.filename}" if e.filename else " (a write failed)"
    return f"the disk is full{where}; free space, then resume (--resume)"


def input_path_message(e: OSError) -> str | None:
    """The one-line error for a path the user gave that the file system refuses as such (a name too long, a
    component that is a file, a symlink loop, no permission), naming it; else None (a bug: its traceback)."""
    import errno

    if e.filename is None or e.errno not in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EACCES,
                                             errno.EPERM, errno.EISDIR, errno.ENOENT, errno.EROFS, errno.EEXIST):
        return None
    name = str(e.filename)
    shown = repr(name if len(name) <= 80 else name[:60] + "..." + name[-17:])
    if e.errno == errno.EEXIST:  # mkdir(exist_ok=True) on a path that is something else than a folder
        what = path_problem(name, want="folder")
        return f"{shown} {what}; give a folder (or a path that does not exist yet)" if what else None
    return f"{shown}: {e.strerror or 'cannot be used'}; check the path you gave"


_SPECIAL = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
            stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def path_problem(path: str | os.PathLike[str], *, want: str = "file") -> str | None:
    """Why `path` cannot be read as `want` ("file", "folder" or "file or folder"), as the end of a sentence
    that starts with the path ("does not exist", "is a folder, not a file", "is a FIFO (named pipe), not a
    regular file"); None when it can. Checked before a path is opened: opening a FIFO blocks until someone
    writes to it, and a device like /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except (OSError, ValueError) as e:  # a name too long, a component that is a file, a loop, a NUL byte
        return f"cannot be used ({getattr(e, 'strerror', None) or e})"
    if stat.S_ISDIR(mode):
        return None if "folder" in want else "is a folder, not a file"
    if stat.S_ISREG(mode):
        return None if "file" in want else "is a file, not a folder"
    kind = next(name for test, name in _SPECIAL.items() if test(mode))
    return f"is {kind}, not {'a regular file' if 'file' in want else 'a folder'}"
