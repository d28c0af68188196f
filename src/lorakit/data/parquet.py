"""Parquet instruction data: one record per row, read in record batches (pyarrow), never the whole table.

Columns map to record keys as JSON fields do (`instruction`/`input`/`output`, `messages` as a list of
{role, content} structs, `conversations` as {from, value}); a null `input` is no input. Rows are numbered
from 1, and bad rows are reported as `<file> row <n>`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import DataError

BATCH_ROWS = 1024


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row number from 1, the row as a dict) of a .parquet file; a file pyarrow cannot read raises DataError."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(path, None, None, "reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, None, f"not a readable parquet file ({e})") from None
    row = 0
    try:
        for batch in reader.iter_batches(batch_size=BATCH_ROWS):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, None, f"parquet file unreadable after row {row} ({e})") from None
