"""Turn Search-R1 parquet or FlashRAG jsonl into veRL training files for the TSPO example.

Each output row is a Search-R1 row (``tspo.data.qa.searchr1_rows``) whose ``extra_info`` also holds
the ``question``, which the veRL reward function needs for FOLR's question guard and which
Search-R1's own files leave out of ``extra_info``.

    python examples/verl/prepare_data.py IN_FILE OUT.parquet [--split train]
"""

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tspo.data.qa import read_qa, searchr1_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Search-R1 .parquet or FlashRAG .jsonl file")
    parser.add_argument("out", type=Path, help="the .parquet file to write")
    parser.add_argument("--split", default="train", help="split name stored in extra_info")
    args = parser.parse_args()

    examples = read_qa(args.source)
    rows = searchr1_rows(examples, args.split)
    for row, example in zip(rows, examples, strict=True):
        row["extra_info"] = {**row["extra_info"], "question": example.question}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out)
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
