"""Shards: runs of whole windows of rows, the unit of work handed to a worker or a Ray actor.

    rows [0, total)  ->  shards [0, 16) [16, 32) ... on --rows-per-window boundaries

A window's answers depend only on its rows, and windows always start at multiples of
--rows-per-window, so however rows are grouped into shards the answers are the same.
The Ray engine names each shard's file by its row range (`part-000000000016-000000000032.parquet`)
and finds what is left to do from the names alone. Pure functions: no I/O here.
"""

from __future__ import annotations

import math
import re

SHARDS_PER_WORKER = 4  # more shards balance uneven devices; fewer mean fewer row-group re-reads

Range = tuple[int, int]  # rows [start, end)

_NAME = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")


def split_ranges(ranges: list[Range], rows_per_window: int, rows_per_shard: int) -> list[Range]:
    """Cut row ranges into shards of at most `rows_per_shard` rows, on window boundaries."""
    step = max(1, math.ceil(rows_per_shard / rows_per_window)) * rows_per_window
    shards = []
    for start, end in ranges:
        for a in range(start, end, step):
            shards.append((a, min(a + step, end)))
    return shards


def balanced_shard_rows(ranges: list[Range], workers: int) -> int:
    """Rows per shard that give each worker about SHARDS_PER_WORKER shards."""
    rows = sum(end - start for start, end in ranges)
    return max(1, math.ceil(rows / (max(1, workers) * SHARDS_PER_WORKER)))


def shard_name(start: int, end: int) -> str:
    """The file of rows [start, end): sorting the names sorts the rows."""
    return f"part-{start:012d}-{end:012d}.parquet"


def parse_shard_name(name: str) -> Range | None:
    """The row range a shard file's name gives, or None for any other file."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def tile(found: list[Range], total: int) -> tuple[list[Range], list[Range], list[Range]]:
    """Choose shards that hold each row of [0, total) at most once: (kept, redundant, missing).

    `found` are the ranges of the shard files present. Shards of runs with different shard
    sizes can overlap (a run cut short, resumed with more actors); their rows are the same
    windows with the same answers, so any choice is right: the longest first from each start.
    `redundant` overlap a kept shard (or lie outside [0, total)); `missing` are the gaps. An empty
    table's output is one empty file, (0, 0).
    """
    kept: list[Range] = []
    redundant: list[Range] = []
    missing: list[Range] = []
    pos = 0
    for a, b in sorted(found, key=lambda r: (r[0], -r[1])):
        if (a, b) == (0, 0) == (pos, total) and not kept:
            kept.append((0, 0))
            continue
        if a < pos or b <= a or b > total:
            redundant.append((a, b))
            continue
        if a > pos:
            missing.append((pos, a))
        kept.append((a, b))
        pos = b
    if pos < total:
        missing.append((pos, total))
    return kept, redundant, missing
