"""The results CSV of a benchmark run: every row carries the run's metadata, and the file is rewritten (atomically)
after every row, so a run cut short keeps what it measured."""

from __future__ import annotations

import os

from headkv_engine.files import write_csv_atomic


class CsvRows:
    def __init__(self, path: str, meta: dict, force: bool):
        if os.path.exists(path) and not force:
            raise SystemExit(f"{path} exists; pass --force to overwrite it")
        self.path, self.meta, self.rows = path, meta, []

    def record(self, row: dict) -> None:
        self.rows.append({**self.meta, **row})
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        write_csv_atomic(self.path, self.rows)
