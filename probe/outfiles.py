"""Output files a command writes at its end (``--json``, ``--junit``, ``--html``): checked before
the work starts, so a run never ends with a report it cannot write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from probe.errors import ConfigError

__all__ = ["check_output"]


def check_output(option: str, path: str | os.PathLike[str] | None) -> None:
    """Refuse ``path`` (given as ``option``) with one sentence unless a file can be written there:
    its directory exists and takes a new file (a report is written beside its name and renamed
    over it), and the name is a regular file or nothing yet (not a directory, a device or a
    pipe). Leaves nothing behind: an existing file is opened for appending, without writing, and
    the directory is tried with a temporary file removed at once. None: nothing to check."""
    if path is None:
        return
    p = Path(path)
    shown = os.fspath(path)
    if p.is_dir():
        raise ConfigError(f"{option} {shown!r} is a directory; give a file name.")
    parent = p.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {shown!r}: the directory {str(parent)!r} does not exist.")
    if p.exists() and not p.is_file():
        raise ConfigError(f"{option} {shown!r} is not a regular file; give a file name.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".check", dir=parent)
    except OSError as exc:
        raise ConfigError(
            f"{option} {shown!r} cannot be written: no file can be created in "
            f"{str(parent)!r} ({exc.strerror or exc})."
        ) from None
    os.close(fd)
    os.unlink(tmp)
    if p.exists():
        try:
            with open(p, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"{option} {shown!r} cannot be written ({exc.strerror or exc})."
            ) from None
