"""Crash-safe writes: files and whole folders that readers see old or new, never half-written.

* ``atomic_write_bytes``: a temporary file in the same folder, fsync, one rename.
* ``staging_folder`` + ``switch_folder``: a complete new folder is written beside the target, then switched in by
  one ``renameat2(RENAME_EXCHANGE)`` (Linux), so the target path always holds the old or the new folder.

``tempfile`` creates files 0600 and folders 0700; everything here is given the permissions a plain ``open`` or
``mkdir`` would give under the process umask (usually 0644 / 0755), so a server running as another user can read
what the library saved.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows; else set-and-restore under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    return 0o777 & ~current_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def folder_lock(folder: Path, shared: bool = False) -> Iterator[None]:
    """Hold a lock on ``folder`` itself (flock on its descriptor: no lock file is left behind): exclusive for a
    saver, shared for a reader. A no-op where ``fcntl`` does not exist (Windows) or the folder cannot be opened.

    The lock cannot outlive the block: the descriptor is opened inside the ``try`` whose ``finally`` releases it, the
    release unlocks before it closes (an interrupt during the close still leaves the folder unlocked), and the close
    runs in a ``finally`` of its own (an interrupt during the unlock still closes it).
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = -1
    try:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            fd = -1
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            finally:
                os.close(fd)  # closing the descriptor releases the lock in any case


@contextmanager
def sibling_lock(target: Path, shared: bool = False) -> Iterator[None]:
    """Hold the lock that readers and the writer of the folder ``target`` share: a flock on the folder that holds
    ``target`` (``save_unlearned`` replaces ``target`` as a whole, so a lock on ``target`` itself would be swapped
    away with it; no lock file is left behind). Exclusive for the writer while it switches ``target``, shared for
    readers while they read it. A no-op where the parent cannot be opened or ``fcntl`` does not exist."""
    with folder_lock(Path(target).absolute().parent, shared=shared):
        yield


# what atomic_write_bytes, staging_folder and switch_folder name their temporaries: "." + name + "." + 8 characters
# of tempfile's alphabet + ".tmp" (or ".old")
_TEMPORARY = re.compile(r"\.(?P<of>.+)\.[a-z0-9_]{8}\.(tmp|old)", re.DOTALL)


def is_own_temporary(name: str, of: str | None = None) -> bool:
    """True for a name this module gives temporaries (of the file or folder ``of``, when given)."""
    match = _TEMPORARY.fullmatch(name)
    return match is not None and (of is None or match.group("of") == of)


def remove_stale_files(folder: Path) -> list[str]:
    """Remove the temporary files a killed ``atomic_write_bytes`` left in ``folder`` (call it holding the folder's
    exclusive lock, under which every write of the folder runs, so no live writer owns them). Returns their names."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        if is_own_temporary(path.name) and path.name.endswith(".tmp") and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def remove_stale_staging(target: Path) -> list[str]:
    """Remove staging and old folders of ``target`` that a killed save left beside it. A live save holds an
    exclusive lock on its staging folder (``hold_folder``), so only folders nobody holds are removed."""
    target = Path(target)
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    try:
        import fcntl
    except ImportError:
        return removed
    for path in entries:
        if not is_own_temporary(path.name, target.name) or path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live save owns it
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        finally:
            os.close(fd)
    return removed


def staging_folder(target: Path) -> Path:
    """A new empty hidden folder beside ``target`` (same file system, so it can be renamed into place)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(folder, folder_mode())
    return folder


def fix_modes(folder: Path, since: float | None = None) -> None:
    """Give files and folders under ``folder`` the umask's permissions (safetensors and tempfile create 0600 files
    and 0700 folders). With ``since`` (a ``time.time()``), only what was modified from then on: a save into an
    existing folder leaves the user's other files alone."""
    files, folders = file_mode(), folder_mode()
    for root, dirs, names in os.walk(folder):
        for name, mode in [*((d, folders) for d in dirs), *((n, files) for n in names)]:
            path = os.path.join(root, name)
            if not os.path.islink(path) and (since is None or os.stat(path).st_mtime >= since):
                os.chmod(path, mode)
    if since is None or os.stat(folder).st_mtime >= since:
        os.chmod(folder, folders)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange_folders(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def switch_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target`` and remove the old one.

    The switch is one atomic exchange: at every moment ``target`` is the old folder or the new one. Where the OS
    has no exchange, the old folder is renamed away first (a crash between the two renames leaves it beside
    ``target`` as ``.<name>.*.old``).
    """
    new, target = Path(new), Path(target)
    fsync_folder(new)
    try:
        os.rename(new, target)  # no target yet: one rename
        fsync_folder(target.parent)
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
    if exchange_folders(new, target):  # ``new`` now holds the old folder
        fsync_folder(target.parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    fsync_folder(target.parent)
    shutil.rmtree(old, ignore_errors=True)
