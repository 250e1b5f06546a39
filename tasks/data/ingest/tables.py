"""Caption/transcript tables (CSV or Parquet) as read: the Arrow table, its required columns, its rows, and the files
its cells name, checked (for the plan in sources.py) or only stat'ed (for `Sources.cache_key`). Which rows become
which items, and with which split, label and meta, is sources.py's job.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tasks.data.ingest.decode import one_line
from tasks.data.ingest.inputs import IngestError, Refused, check_file, inside, is_url

if TYPE_CHECKING:
    from tasks.data.ingest.sources import IngestConfig, Kind


def _option(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _arrow_table(path: Path, what: str, as_text: tuple[str, ...], bad_rows: list[str] | None) -> pa.Table:
    """A CSV or Parquet table (CSV: `as_text` columns read as strings; malformed rows into `bad_rows`, or all string
    columns and malformed rows skipped when it is None); IngestError for an unreadable or unsupported file."""
    suffix = path.suffix.lower()

    def bad_row(row) -> str:
        if bad_rows is not None:
            bad_rows.append(f"expected {row.expected_columns} columns, got {row.actual_columns}: {row.text[:80]!r}")
        return "skip"

    try:
        if suffix == ".csv":
            convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in as_text})
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(invalid_row_handler=bad_row),
                                  convert_options=convert)
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        msg = f"cannot read {what} table {path}: {one_line(err)}; check that it is a valid {suffix[1:]} file"
        raise IngestError(msg) from None
    fmt = suffix or "(none)"
    raise IngestError(f"{what} table {path} has unsupported format {fmt!r}; use a .csv or .parquet file")


def check_columns(path: Path, columns: list[str], kind: Kind, cfg: IngestConfig) -> None:
    """IngestError unless a table has its path column and its text column (caption/transcript); a table of labels or
    splits only (a `label` or `split` column) needs no text column. `tessera data` checks the header with this
    before any stage runs, ingest the table it reads."""
    path_col, text_col = getattr(cfg, kind.path_col), getattr(cfg, kind.text_col)
    need = [(path_col, kind.path_col)]
    if not {cfg.label_col, "split"} & set(columns):
        need.append((text_col, kind.text_col))
    missing = [(c, f) for c, f in need if c not in columns]
    if missing:
        names = " and ".join(f"{c!r}" for c, _ in missing)
        opts = " / ".join(f"{_option(f)} NAME" for _, f in missing)
        also = f", or give it a {cfg.label_col!r} or 'split' column" if kind.text_col in dict(missing).values() else ""
        noun = "column" if len(missing) == 1 else "columns"
        raise IngestError(f"{kind.table} table {path} has no {names} {noun} (columns: {', '.join(columns) or 'none'}); "
                          f"name the right column with {opts}{also}")


def read_table(path: Path, kind: Kind, cfg: IngestConfig, bad_rows: list[str] | None = None) -> list[dict]:
    """A caption/transcript table's rows; IngestError for an unsupported format or missing columns. Malformed CSV
    rows (a wrong number of fields) are left out and described in `bad_rows`."""
    path_col, text_col = getattr(cfg, kind.path_col), getattr(cfg, kind.text_col)
    table = _arrow_table(path, kind.table, (path_col, text_col, cfg.label_col, "split"), bad_rows)
    check_columns(path, table.column_names, kind, cfg)
    return table.to_pylist()


def _table_files(table: Path, roots: tuple[Path, ...]) -> Iterator[tuple[str, Path]]:
    """(cell, resolved path) of every string cell of a table that names a regular file inside the roots: the files
    a table may point at, whichever column names them. Stats only; an unreadable table yields nothing."""
    if not table.is_file():  # stat: a FIFO or device named as a table is never opened
        return
    try:
        t = _arrow_table(table, "cache-key", (), None)
    except IngestError:
        return
    cells: set[str] = set()
    for col in t.columns:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            cells.update(v for v in col.unique().to_pylist() if v and len(v) < 4096 and "\n" not in v)
    for cell in sorted(cells):
        p = Path(os.path.expanduser(cell.strip()))
        file = p if p.is_absolute() else table.parent / p
        try:
            if is_url(cell) or not stat.S_ISREG(os.stat(file).st_mode):
                continue
        except (OSError, ValueError):
            continue
        if inside(real := Path(os.path.realpath(file)), roots):
            yield cell, real


def _row_file(value: str, table_dir: Path, roots: tuple[Path, ...], where: str) -> Path:
    """The checked, resolved file a table cell names, else Refused (URLs, and see inputs.check_file)."""
    if is_url(value):
        raise Refused(f"URL in a table: {where} names {value}; URLs are read only as --shards given on the command "
                      "line or in the config, never from a table")
    p = Path(os.path.expanduser(value))
    file = p if p.is_absolute() else table_dir / p
    return check_file(file, roots, f"{where} points at {file}")
