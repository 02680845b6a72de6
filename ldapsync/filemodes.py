"""Files only ldapsync may read: the state directory, the SQLite files and dumps.

Owns the modes of what ldapsync creates on disk that holds password hashes or
secrets, like slapd's 0600 default for its database:

- the directory of the SQLite database (``var/`` by default) is created 0700;
- the database file is created 0600 *before* SQLite opens it (SQLite creates
  its ``-wal`` and ``-shm`` files with the database file's mode, whatever the
  umask); at every start a database file, ``-wal``, ``-shm`` or ``-journal``
  that others can read is set back to 0600 when it belongs to the running user
  (a warning says so), and only warned about when it belongs to someone else;
- the admin password file and the ``[secrets]`` key are created 0600 by their
  owners (``directory/facade.py``, ``ldapsync/secretbox.py``); one others can read
  (written by hand) is warned about at start, not changed;
- ``ldapsync ldif dump -o FILE`` writes 0600, and refuses a file that belongs
  to another user (one planted in /tmp would hand every hash to its owner).

Modes are set with ``chmod``/``fchmod`` after creation, so they do not depend
on the umask.  Directories that already exist are left as they are (they may
be the admin's, e.g. ``/srv``); the files in them are what is protected.
Nothing here reads file contents.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = ["PRIVATE_DIR", "PRIVATE_FILE", "make_private_dir", "open_private_output", "prepare_sqlite_files",
           "sqlite_path", "tighten"]

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def make_private_dir(path: str | os.PathLike[str]) -> None:
    """Create ``path`` (0700, umask-independent) if it does not exist; its parents get the usual mode."""
    p = Path(path)
    if p.is_dir():
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        p.mkdir(mode=PRIVATE_DIR)
    except FileExistsError:
        return                       # another process (the CLI, the server) made it first
    os.chmod(p, PRIVATE_DIR)


def tighten(path: str | os.PathLike[str], *, holds: str = "password hashes", fix: bool = True) -> str | None:
    """Make a file others can read 0600 if it is ours (and ``fix``); a line saying what was found,
    or None when it is private.  A file of another user is not touched: the line says what to do."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if not fix or st.st_uid != os.geteuid():
        return (f"{path} is readable by other users (mode {mode:04o}, owner uid {st.st_uid}); "
                f"it holds {holds}: make it mode 0600, owned by the user the server runs as")
    os.chmod(path, PRIVATE_FILE)
    return f"{path} was readable by other users (mode {mode:04o}); set to 0600: it holds {holds}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (relative to the working directory), else None."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def prepare_sqlite_files(db: Path) -> list[str]:
    """The database directory (0700 when new) and file (0600 when new) before SQLite opens them;
    existing files others can read are tightened.  Returns warnings for the log."""
    make_private_dir(db.parent)
    try:
        fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        pass
    else:
        try:
            os.fchmod(fd, PRIVATE_FILE)      # an empty file is an empty SQLite database
        finally:
            os.close(fd)
    warnings = []
    for suffix in SQLITE_SUFFIXES:
        line = tighten(f"{db}{suffix}")
        if line:
            warnings.append(line)
    return warnings


class ForeignFileError(PermissionError):
    """The output file exists and belongs to another user."""


def open_private_output(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for writing, mode 0600, truncated: for output holding hashes (``ldif dump -o``).

    An existing regular file of another user is refused before anything is written to it (or it is
    truncated); one of ours is set to 0600 first.  Devices and pipes (``/dev/stdout``) are used as
    they are."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if st.st_uid != os.geteuid():
                raise ForeignFileError(f"{path} belongs to another user (uid {st.st_uid}); it would be able to "
                                       f"read the dump: remove it or write to another file")
            os.fchmod(fd, PRIVATE_FILE)
            os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
