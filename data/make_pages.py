"""Build data/pages.parquet from SQuAD 2.0 dev text (CC BY-SA 4.0, see data/README.md).

Usage: python data/make_pages.py [path/to/squad_v2_dev_2articles.json]

Documents stored as many rows, the shape `--document-col` reads: each article is a document
(`title`), each of its paragraphs a page, one row per page in order (`page`, 0-based; `page_id`,
`<title>/<page>`, the id that names the page an answer comes from).
"""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = os.path.join(HERE, "..", "..", "shared", "data", "squad_v2_dev_2articles.json")


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SOURCE
    with open(source, encoding="utf-8") as f:
        articles = json.load(f)["data"]
    rows = {"title": [], "page": [], "page_id": [], "passage": []}
    for article in articles:
        for i, paragraph in enumerate(article["paragraphs"]):
            rows["title"].append(article["title"])
            rows["page"].append(i)
            rows["page_id"].append(f"{article['title']}/{i}")
            rows["passage"].append(paragraph["context"])
    table = pa.table(rows, schema=pa.schema([("title", pa.string()), ("page", pa.int32()), ("page_id", pa.string()),
                                             ("passage", pa.string())]))
    pq.write_table(table, os.path.join(HERE, "pages.parquet"))
    print(f"wrote {table.num_rows} pages of {len(articles)} documents to data/pages.parquet")


if __name__ == "__main__":
    main()
