"""Writing results: every file is written to a temporary name beside it and renamed into place, so a reader
never sees half a file."""

from __future__ import annotations

import os


def write_text_atomic(path, text: str) -> None:
    path = os.fspath(path)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_figure(fig, path, dpi: int = 110) -> None:
    """Lay out, save (atomically) and close a matplotlib figure."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    path = os.fspath(path)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=dpi)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
