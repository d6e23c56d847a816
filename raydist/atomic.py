"""Crash-consistent files: a process killed while writing leaves the previous version readable.

Every file a run, a sweep or an evaluation rewrites (last.pt, best.pt, summary.json, trials.csv, parquet parts)
goes through :func:`write_atomic`: the new content is written to a temporary file in the same directory, flushed
to disk (fsync), and renamed over the old one (``os.replace``, atomic on POSIX filesystems), so a reader sees the
old file or the new one, never a mix. Renaming makes a new inode: a hard link taken earlier (Ray Train's
checkpoint directory links last.pt and best.pt) keeps pointing at the version it linked.

Files that grow by lines (metrics.jsonl) are appended with :func:`append_line`, one complete line per call; a
line torn by a crash is never read (:func:`read_lines` returns complete lines only) and is cut off by the next
append, so the file never holds a broken row between good ones.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["append_line", "read_lines", "temp_name", "write_atomic"]

TEMP_MARK = ".tmp-"


def temp_name(path: Path) -> Path:
    """A hidden sibling of ``path`` no other writer uses (globs such as ``*.parquet`` or ``part-*`` skip it)."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory); best effort elsewhere."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, content: bytes | str | Callable[[IO[bytes]], object]) -> Path:
    """Replace ``path`` with ``content`` all at once: bytes, text (UTF-8), or a function that writes into the
    binary file it is given (``lambda f: torch.save(obj, f)``, ``lambda f: pq.write_table(t, f)``).

    The file appears complete or not at all; if writing fails, the old file is untouched and the temporary
    file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode())
            elif isinstance(content, (bytes, bytearray, memoryview)):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a newline is added) durably. A torn last line a crashed writer left (no newline) is cut
    off first, so every line in the file is one a writer finished."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    if "\n" in line.rstrip("\n"):
        raise ValueError("append_line takes a single line")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.ftruncate(fd, _complete_length(fd, size))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete_length(fd: int, size: int) -> int:
    """Bytes up to and including the last newline of the open file (0 if it has none)."""
    end, block = size, 1 << 16
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def read_lines(path: str | os.PathLike) -> list[str]:
    """The complete lines of a file written with :func:`append_line` (a torn last line is left out; blank lines
    are skipped); a missing file has none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    complete = data[: data.rfind(b"\n") + 1]
    return [line for line in complete.decode(errors="replace").splitlines() if line.strip()]
