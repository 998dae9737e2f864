"""Shards, the Ray actor plan and the directory commit, as pure functions (no Ray, no model)."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.engines import commit
from pipeline.engines.ray_engine import plan_actors
from pipeline.engines.shards import parse_shard_name, shard_name, split_ranges, tile


def test_shard_names_give_back_their_row_range_and_sort_in_row_order():
    names = [shard_name(a, b) for a, b in [(0, 16), (16, 32), (1024, 2000)]]
    assert names == sorted(names)
    assert [parse_shard_name(n) for n in names] == [(0, 16), (16, 32), (1024, 2000)]
    for other in ("part-000000000000.parquet", "_SUCCESS", ".part-000000000000-000000000016.parquet.inprogress",
                  "part-000000000000-000000000016.parquet.tmp"):
        assert parse_shard_name(other) is None


@pytest.mark.parametrize("found,total,kept,redundant,missing", [
    ([], 10, [], [], [(0, 10)]),
    ([(0, 4), (4, 8), (8, 10)], 10, [(0, 4), (4, 8), (8, 10)], [], []),
    ([(0, 4), (8, 10)], 10, [(0, 4), (8, 10)], [], [(4, 8)]),
    # a run cut short with shards of 8, resumed with shards of 4: every row once, the longest first
    ([(0, 8), (0, 4), (4, 8), (8, 12)], 12, [(0, 8), (8, 12)], [(0, 4), (4, 8)], []),
    ([(0, 8), (4, 12)], 16, [(0, 8)], [(4, 12)], [(8, 16)]),
    ([(0, 4), (8, 20)], 10, [(0, 4)], [(8, 20)], [(4, 10)]),  # beyond the rows planned: not this job's
    ([(0, 0)], 0, [(0, 0)], [], []),  # an empty table: one empty file
    ([(0, 0), (0, 4)], 4, [(0, 4)], [(0, 0)], []),
])
def test_tile_keeps_each_row_once_and_names_the_gaps(found, total, kept, redundant, missing):
    assert tile(found, total) == (kept, redundant, missing)


def test_what_is_left_splits_into_shards_on_window_boundaries():
    _, _, missing = tile([(0, 8), (16, 24)], 45)
    assert split_ranges(missing, 4, 8) == [(8, 16), (24, 32), (32, 40), (40, 45)]


def node(cpus, gpus=0):
    return {"CPU": float(cpus), "GPU": float(gpus), "memory": 1e10}


def test_a_two_core_machine_runs_one_cpu_actor_with_both_cores_as_workers():
    p = plan_actors([node(2)], None, None, None)
    assert (p.gpu, p.actors, p.fixed, p.cpus, p.threads) == (False, 1, False, 2.0, 2)


def test_cpu_actors_fill_every_node_four_cores_each_at_most():
    p = plan_actors([node(64), node(64)], None, None, None)
    assert (p.actors, p.cpus, p.threads, p.cluster_cpus) == (32, 4.0, 4, 128.0)
    # a head node without CPUs for work takes no actor; the smallest node sets the actor's size
    p = plan_actors([node(0), node(2), node(16)], None, None, None)
    assert (p.actors, p.cpus, p.threads) == (9, 2.0, 2)


def test_cpu_options_fix_the_pool_or_the_cores_per_actor():
    p = plan_actors([node(2)], None, 2, None)  # --cpu-workers 2: two actors, the cores shared out
    assert (p.actors, p.fixed, p.cpus, p.threads) == (2, True, 1.0, 1)
    p = plan_actors([node(16)], None, None, 8.0)  # --num-cpus-per-worker 8
    assert (p.actors, p.fixed, p.cpus, p.threads) == (2, False, 8.0, 8)
    p = plan_actors([node(2)], None, None, 0.5)  # fractional: one thread each, as many as asked fit
    assert (p.actors, p.cpus, p.threads) == (4, 0.5, 1)


def test_gpus_mean_one_actor_per_gpu_unless_told_otherwise():
    p = plan_actors([node(8), node(16, 4), node(16, 4)], None, None, None)  # auto
    assert (p.gpu, p.actors, p.fixed, p.cpus, p.threads, p.cluster_gpus) == (True, 8, False, 1.0, 1, 8.0)
    p = plan_actors([node(16, 4)], 2, None, None)  # --num-gpus 2
    assert (p.gpu, p.actors, p.fixed) == (True, 2, True)
    p = plan_actors([node(16, 4)], 0, None, None)  # --num-gpus 0: CPU actors on a GPU cluster
    assert (p.gpu, p.actors, p.threads) == (False, 4, 4)
    p = plan_actors([node(2, 4)], None, None, None)  # GPUs beyond the node's CPUs wait for CPUs
    assert p.actors == 2


def test_publish_renames_the_directory_and_keeps_the_older_output_until_the_new_one_is_in(tmp_path):
    files, output = tmp_path / "out.partial" / "files", tmp_path / "out"
    files.mkdir(parents=True)
    (files / shard_name(0, 4)).write_bytes(b"new")
    commit.write_success(str(files), {"rows": 4, "job_id": "new"})
    output.mkdir()
    (output / "part-old.parquet").write_bytes(b"old")
    (output / commit.SUCCESS).write_text(json.dumps({"job_id": "old"}))
    commit.publish(str(files), str(output))
    assert sorted(os.listdir(output)) == [commit.SUCCESS, shard_name(0, 4)]
    assert commit.read_success(str(output)) == {"rows": 4, "job_id": "new"}
    assert not files.exists() and not os.path.exists(commit.aside_path(str(output)))
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
