#!/usr/bin/env python3
"""Checks a run's Parquet outputs against the schemas documented in README.md.

    check_parquet.py README.md OUTPUT_DIR [TABLE ...]

For every table documented in the README's "Outputs" section (a paragraph naming `NAME.parquet`
followed by a `| column | type | meaning |` table) whose files exist in OUTPUT_DIR
(`NAME.parquet` and `NAME-from-*.parquet`), each file must:
  * read with pyarrow, with exactly the documented columns, in order, of the documented types,
    none nullable unless its type cell says so (`string, nullable`);
  * read with pandas (no arguments beyond the path), same columns and rows; timestamps UTC;
  * read with duckdb's read_parquet, same columns and rows;
and all of a table's files must read together as one dataset (duckdb glob, pyarrow dataset).
TABLEs (names without .parquet) must exist. Exit 1 listing every mismatch.
"""

import glob
import os
import re
import sys

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq


def documented_tables(readme):
    """{table name: [(column, type, nullable)]} from the README's Outputs section."""
    text = open(readme, encoding="utf-8").read()
    start = text.find("## Outputs")
    if start < 0:
        sys.exit("README has no '## Outputs' section")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else len(text)]
    tables = {}
    current = None
    rows = None
    for line in section.splitlines():
        named = re.match(r"^`([a-z_]+)\.parquet`", line)
        if named:
            current = named.group(1)
            rows = None
            continue
        if current and line.startswith("| column | type |"):
            rows = []
            tables[current] = rows
            continue
        if rows is not None and line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set(cells[0]) <= set("-: "):
                continue
            names = re.findall(r"`([^`]+)`", cells[0])
            typ, nullable = cells[1], False
            if typ.endswith(", nullable"):
                typ, nullable = typ[: -len(", nullable")], True
            for n in names:
                rows.append((n, typ, nullable))
            continue
        if rows is not None and not line.strip():
            rows = None
            current = None
    return tables


def normalise(arrow_type):
    """pyarrow's type string in the README's spelling: list<double>, timestamp[us, UTC]."""
    s = str(arrow_type)
    s = s.replace("list<item: ", "list<").replace("tz=", "").replace(" not null", "")
    return s


def check_file(path, columns, problems):
    name = os.path.basename(path)
    table = pq.read_table(path)
    got = [(f.name, normalise(f.type), f.nullable) for f in table.schema]
    if got != columns:
        problems.append(f"{name}: pyarrow schema (name, type, nullable) {got}\n  documented {columns}")
    frame = pd.read_parquet(path)
    if list(frame.columns) != [c for c, _, _ in columns]:
        problems.append(f"{name}: pandas columns {list(frame.columns)}")
    if len(frame) != table.num_rows:
        problems.append(f"{name}: pandas read {len(frame)} rows, pyarrow {table.num_rows}")
    for col, typ, _ in columns:
        if typ.startswith("timestamp") and col in frame:
            tz = getattr(frame[col].dtype, "tz", None)
            if tz is None or str(tz) != "UTC":
                problems.append(f"{name}: pandas reads {col} as {frame[col].dtype}, not UTC")
    con = duckdb.connect()
    described = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()
    if [r[0] for r in described] != [c for c, _, _ in columns]:
        problems.append(f"{name}: duckdb columns {[r[0] for r in described]}")
    (count,) = con.execute("SELECT count(*) FROM read_parquet(?)", [path]).fetchone()
    if count != table.num_rows:
        problems.append(f"{name}: duckdb counts {count} rows, pyarrow {table.num_rows}")
    return table.num_rows


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    readme, out = sys.argv[1], sys.argv[2]
    required = sys.argv[3:]
    tables = documented_tables(readme)
    problems = []
    for name in required:
        if name not in tables:
            problems.append(f"table {name} is not documented in {readme}")
    for name, columns in sorted(tables.items()):
        if not columns:
            problems.append(f"table {name}: documented without columns")
            continue
        files = sorted(
            glob.glob(os.path.join(out, f"{name}.parquet"))
            + glob.glob(os.path.join(out, f"{name}-from-*.parquet"))
        )
        if not files:
            if name in required:
                problems.append(f"table {name}: no {name}.parquet in {out}")
            continue
        rows = sum(check_file(f, columns, problems) for f in files)
        together = pads.dataset(files, format="parquet").to_table().num_rows
        (count,) = duckdb.connect().execute(
            "SELECT count(*) FROM read_parquet(?)", [files]
        ).fetchone()
        if together != rows or count != rows:
            problems.append(
                f"table {name}: files read together give {together} (pyarrow) / {count} (duckdb) rows, one by one {rows}"
            )
        print(f"{name}: {len(files)} file(s), {rows} rows, {len(columns)} columns as documented")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
    print(f"ok: pyarrow {pa.__version__}, pandas {pd.__version__}, duckdb {duckdb.__version__}")


if __name__ == "__main__":
    main()
