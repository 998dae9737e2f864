"""Build data/sample.parquet from SQuAD 2.0 dev text (CC BY-SA 4.0, see data/README.md).

Usage: python data/make_sample.py [path/to/squad_v2_dev_2articles.json]

45 rows: for each of the two articles, 12 questions asked of the whole article joined into
one long passage (thousands of tokens: many chunks each) and 12 asked of a single
paragraph; about a third of the questions are unanswerable (SQuAD 2.0 `is_impossible`).
"""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = os.path.join(HERE, "..", "..", "shared", "data", "squad_v2_dev_2articles.json")


def pick(qas: list[dict], n: int, impossible_share: float = 1 / 3) -> list[dict]:
    """The first questions of each kind, so that the sample is stable and mixed."""
    n_imp = round(n * impossible_share)
    imp = [q for q in qas if q["is_impossible"]][:n_imp]
    pos = [q for q in qas if not q["is_impossible"]][: n - len(imp)]
    return sorted(pos + imp, key=lambda q: qas.index(q))


def rows_for(article: dict) -> list[dict]:
    paragraphs = article["paragraphs"]
    joined = "\n\n".join(p["context"] for p in paragraphs)
    shift, rows = 0, []
    all_qas = []
    for p in paragraphs:  # answers shifted into the joined passage
        for q in p["qas"]:
            all_qas.append({**q, "answers": [{**a, "answer_start": a["answer_start"] + shift}
                                             for a in q["answers"]]})
        shift += len(p["context"]) + 2
    for q in pick(all_qas[::7], 12):  # spread over the article
        rows.append(_row(article["title"], joined, q, "article"))
    para = paragraphs[1]
    for q in pick(para["qas"] + paragraphs[2]["qas"], 12):
        context = para["context"] if q in para["qas"] else paragraphs[2]["context"]
        rows.append(_row(article["title"], context, q, "paragraph"))
    return rows


def _row(title: str, passage: str, q: dict, scope: str) -> dict:
    for a in q["answers"]:
        assert passage[a["answer_start"] : a["answer_start"] + len(a["text"])] == a["text"]
    return {
        "id": q["id"] + ("-article" if scope == "article" else ""),
        "title": title,
        "scope": scope,
        "passage": passage,
        "question": q["question"],
        "answers": sorted({a["text"] for a in q["answers"]}),
        "is_impossible": q["is_impossible"],
    }


def main(source: str = DEFAULT_SOURCE, out: str = os.path.join(HERE, "sample.parquet")) -> None:
    with open(source) as f:
        squad = json.load(f)
    rows = [r for article in squad["data"] for r in rows_for(article)]
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("title", pa.string()), ("scope", pa.string()), ("passage", pa.string()),
        ("question", pa.string()), ("answers", pa.list_(pa.string())), ("is_impossible", pa.bool_()),
    ]))
    pq.write_table(table, out, compression="zstd")
    print(f"wrote {out}: {table.num_rows} rows")


if __name__ == "__main__":
    main(*sys.argv[1:2])
