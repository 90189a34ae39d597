"""Writing results: every file is written to a temporary name beside it and renamed into place, so a reader
never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile

# The permission bits `open(path, "w")` would give a new file; mkstemp alone creates it 0600.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a fresh temporary path beside `path` (ending in `suffix`); when the block ends without an exception
    the temporary is renamed onto `path` (os.replace), otherwise it is removed and `path` is left as it was.

    The name is unique (tempfile.mkstemp), so concurrent writes to different files in one directory never collide.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=suffix)
    try:
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_csv_atomic(path, rows) -> None:
    """Rows (dicts) as CSV; the columns are every key in the order of first appearance, blank where a row lacks one."""
    import csv  # noqa: PLC0415

    rows = list(rows)  # read twice: once for the columns, once to write
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_json(path, error=ValueError, what: str = "", hint: str = ""):
    """The JSON value in `path`; a file that is not JSON (or not UTF-8) raises `error` naming the file, as
    "{what}{path}: not a JSON file (...){hint}"."""
    import json  # noqa: PLC0415

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what}{path}: not a JSON file ({exc}){hint}") from None


def read_csv(path) -> list[dict]:
    import csv  # noqa: PLC0415

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def save_figure(fig, path, dpi: int = 110) -> None:
    """Lay out, save (atomically) and close a matplotlib figure; the format follows `path`'s extension
    (matplotlib's savefig.format, png by default, when it has none)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    extension = os.path.splitext(os.fspath(path))[1]
    fmt = extension[1:].lower() or plt.rcParams["savefig.format"]
    try:
        fig.tight_layout()
        with atomic_path(path, extension) as tmp:
            fig.savefig(tmp, dpi=dpi, format=fmt)
    finally:
        plt.close(fig)
