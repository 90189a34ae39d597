"""Writing results: every file is written to a temporary name beside it and renamed into place, so a reader
never sees half a file."""

from __future__ import annotations

import os


def write_text_atomic(path, text: str) -> None:
    path = os.fspath(path)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_csv_atomic(path, rows) -> None:
    """Rows (dicts) as CSV; the columns are every key in the order of first appearance, blank where a row lacks one."""
    import csv  # noqa: PLC0415

    path = os.fspath(path)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def read_csv(path) -> list[dict]:
    import csv  # noqa: PLC0415

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def save_figure(fig, path, dpi: int = 110) -> None:
    """Lay out, save (atomically) and close a matplotlib figure."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    path = os.fspath(path)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=dpi)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
