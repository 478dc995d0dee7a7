"""The one atomic writer: files and directories are written to a temporary sibling, then moved into place."""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block completes.

    On any error the temporary directory is removed and an existing ``path`` is left untouched, so a
    failed save never leaves a half-written checkpoint behind.
    """
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; choose another output path")
    if target == Path.cwd() or (target / ".git").exists():
        raise ValueError(f"refusing to replace {target}: save into a new or model-only directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the final directory should look like any other
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        explained = explain_write_error(err, target, tmp)
        if explained is err:
            raise
        raise explained from err
    backup = None
    if target.exists():  # the backup names the pid and the new content, so a killed swap can be finished
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".old", dir=target.parent))
        (backup / "next").write_text(tmp.name)
        os.replace(target, backup / "content")
    try:
        os.replace(tmp, target)
    except BaseException:
        if backup is not None:  # if this fails too, the backup stays for recover_interrupted_save
            os.replace(backup / "content", target)
            shutil.rmtree(backup, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def explain_write_error(err: BaseException, target: Path, tmp: Path) -> BaseException:
    """``err`` as an OSError naming ``target`` (not the temporary path) and its OS cause; else ``err`` unchanged.

    Some writers hide the cause: torch.save reports a full disk as a RuntimeError (``[enforce fail ...]
    unexpected pos``), safetensors as its own error. For those, a nearly full disk (under 16 MiB free) or
    an unwritable directory is named instead.
    """
    if isinstance(err, OSError) and err.errno is not None:
        name = os.fsdecode(err.filename) if isinstance(err.filename, (str, bytes, os.PathLike)) else None
        if name is not None and not name.startswith(str(tmp)):
            return err
        shown = str(target) + name[len(str(tmp)):] if name is not None else str(target)
        return OSError(err.errno, err.strerror or os.strerror(err.errno), shown)
    if not (isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError"):
        return err  # a writer's own failure; a bad value or a bug is not blamed on the disk
    try:
        if shutil.disk_usage(target.parent).free < 16 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    except OSError:
        return err
    if not os.access(target.parent, os.W_OK):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
    return err


def _gone(path: Path, name: str, *, mine: bool) -> bool:
    """Whether the process that made ``.<name>.<pid>.*`` has ended (``mine``: the answer for this process)."""
    pid = path.name[len(name) + 2:].split(".")[0]
    if not pid.isdigit():
        return True  # made before names carried a pid
    if int(pid) == os.getpid():
        return mine
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def recover_interrupted_save(path: str | os.PathLike) -> str | None:
    """Finish or undo a directory swap killed between its two renames; returns "completed", "rolled back" or None.

    A killed ``atomic_directory`` leaves ``.<name>.<pid>.*.old/content`` (the previous copy) and, in
    ``next``, the name of the complete new copy. With ``path`` missing, the new copy is moved in when it
    is still there (completed), else the old one is put back (rolled back); a warning says which.
    """
    target = Path(path).absolute()
    outcome = None
    if not target.parent.is_dir():
        return None
    for backup in sorted(target.parent.glob(f".{glob.escape(target.name)}.*.old")):
        if not backup.is_dir() or not _gone(backup, target.name, mine=True):
            continue
        content, marker = backup / "content", backup / "next"
        fresh = target.parent / marker.read_text().strip() if marker.is_file() else None
        if content.exists() and not target.exists():
            if fresh is not None and fresh.parent == target.parent and fresh.is_dir():
                os.replace(fresh, target)
                outcome = "completed"
                logger.warning("%s: found a save interrupted between its two renames; completed it (the new copy "
                               "is in place, the previous one was removed)", target)
            else:
                os.replace(content, target)
                outcome = "rolled back"
                logger.warning("%s: found a save interrupted between its two renames; rolled it back (the "
                               "previous copy is in place again)", target)
        shutil.rmtree(backup, ignore_errors=True)
    for partial in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        if partial.is_dir() and _gone(partial, target.name, mine=False):
            shutil.rmtree(partial, ignore_errors=True)  # a save killed while writing: never complete
    return outcome


def _file_mode() -> int:
    """What ``open()`` gives a new file under the current umask (mkstemp would give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_file(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block completes.

    ``suffix`` keeps an extension on the temporary name for writers that infer the format from it
    (e.g. ``.png``). The file gets ordinary permissions, and on any error ``path`` is left untouched.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; choose a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(_file_mode())
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        explained = explain_write_error(err, target, tmp)
        if explained is err:
            raise
        raise explained from err


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary path, then move it to ``path`` (all or nothing); returns ``path``."""
    with atomic_file(path, suffix=suffix) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
