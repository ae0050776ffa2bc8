"""Writing a file so that a crash or an exception never leaves a torn one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[TextIO]:
    """Write text to `path` all or nothing.

    Yields a file opened on a temporary name in the same folder (created if missing); when the block ends
    normally the file replaces `path` (`os.replace`, atomic on POSIX), and on any exception it is removed and
    whatever was at `path` stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
