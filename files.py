"""
Writing files so that a crash, a full disk or Ctrl-C never leaves a half-written one behind.

    atomic_write("log/model_00250.pt", lambda f: torch.save(checkpoint, f))

Checkpoints, token shards and their meta.json, downloaded evaluation data and the logs rewritten
at resume go through here. (A trained tokenizer is a folder: tokenizer.py writes it whole into a
temporary folder and renames that, the same idea one level up.)
"""

import errno
import os

from errors import UserError


def atomic_write(path, write, check=None):
    """write(f) into a temporary file beside path, fsync, then rename it to path. os.replace is atomic
    on POSIX and Windows: path holds either the old content or the whole new one, never a part.
    check(temporary path), if given, may raise to refuse the content before it takes the name (a
    download that is not what it should be). An OSError (disk full, read-only folder, permissions)
    becomes a UserError naming path."""
    # the process id in the name: processes writing the same file (each torchrun rank downloading
    # HellaSwag into one cache) never write into each other's temporary file
    tmp_path = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as e:  # disk full, Ctrl-C, a failing write(): no half-written file stays behind
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if isinstance(e, OSError):
            raise UserError(f"could not write {path}: {describe_os_error(e)}") from e
        raise


def describe_os_error(e):
    """'no space left on the device' for ENOSPC and friends; the system's text otherwise. torch.save
    reports a full disk as a RuntimeError from its zip writer, so callers pass those through here too."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
        return "no space left on the device (free some space, or write elsewhere)"
    if getattr(e, "errno", None) == errno.EROFS:
        return "the file system is read-only"
    if isinstance(e, PermissionError):
        return "permission denied"
    return getattr(e, "strerror", None) or str(e)


def lock_folder(folder):
    """An exclusive lock on folder (its file .lock), or a UserError naming the process that holds it.
    The kernel releases a flock when its process ends, however it ends (kill -9 included), so a
    lock is never stale. Returns the open lock file: closing it releases the lock. Windows has no
    fcntl: there the folder is not locked."""
    try:
        import fcntl
    except ImportError:
        return None
    path = os.path.join(folder, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(
            f"{folder} is in use by {holder}: two runs in one folder would interleave their logs and overwrite "
            f"each other's checkpoints. Wait for it to finish (or stop it), or pass another --log_dir"
        )
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()}\n")
    f.flush()
    return f
