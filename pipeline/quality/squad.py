"""SQuAD v1.1 / v2.0 JSON to a qa-batch input table (with gold answers for `qa-batch eval`)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UsageError

SCHEMA = pa.schema([
    ("id", pa.string()), ("title", pa.string()), ("question", pa.string()), ("passage", pa.string()),
    ("answers", pa.list_(pa.string())), ("answer_starts", pa.list_(pa.int64())), ("is_impossible", pa.bool_()),
])


def _need(cond: bool, path: str, where: str, what: str) -> None:
    if not cond:
        raise UsageError(f"{path}: not SQuAD JSON at {where}: {what}")


def squad_rows(path: str, join_article: bool = False) -> list[dict]:
    """One row per question; with join_article, the passage is the article's paragraphs joined
    by a blank line and the answer offsets are shifted to match."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read it ({e})") from None
    _need(isinstance(doc, dict) and isinstance(doc.get("data"), list), path, "the top level",
          'expected an object with a "data" list')
    rows = []
    for a, article in enumerate(doc["data"]):
        where = f"data[{a}]"
        _need(isinstance(article, dict) and isinstance(article.get("paragraphs"), list), path, where,
              'expected an object with a "paragraphs" list')
        paragraphs = article["paragraphs"]
        joined = "\n\n".join(p.get("context", "") if isinstance(p, dict) else "" for p in paragraphs)
        shift = 0
        for p, para in enumerate(paragraphs):
            pwhere = f"{where}.paragraphs[{p}]"
            _need(isinstance(para, dict) and isinstance(para.get("context"), str)
                  and isinstance(para.get("qas"), list), path, pwhere, 'expected "context" text and a "qas" list')
            for q, qa in enumerate(para["qas"]):
                qwhere = f"{pwhere}.qas[{q}]"
                _need(isinstance(qa, dict) and isinstance(qa.get("question"), str) and "id" in qa, path, qwhere,
                      'expected "id" and "question"')
                answers = qa.get("answers", [])
                _need(isinstance(answers, list) and all(
                    isinstance(x, dict) and isinstance(x.get("text"), str) and isinstance(x.get("answer_start"), int)
                    for x in answers), path, f"{qwhere}.answers", 'expected a list of {"text", "answer_start"}')
                starts = [x["answer_start"] + (shift if join_article else 0) for x in answers]
                rows.append({
                    "id": str(qa["id"]), "title": article.get("title"), "question": qa["question"],
                    "passage": joined if join_article else para["context"],
                    "answers": [x["text"] for x in answers], "answer_starts": starts,
                    "is_impossible": bool(qa.get("is_impossible", not answers)),
                })
            shift += len(para["context"]) + 2
    return rows


def convert(path: str, output: str, join_article: bool = False) -> int:
    rows = squad_rows(path, join_article)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), output, compression="zstd")
    return len(rows)
