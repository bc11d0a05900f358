"""The transport benchmarks run end to end at a tiny size and report consistent figures (no timing thresholds:
these machines are noisy). Each section starts real service processes on loopback."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from services.bench_transport import bench_rollouts, bench_weight_sync, raw_socket_seconds, replica_counts


def test_weight_sync_moves_every_tensor_byte_and_compares_with_the_same_bytes_on_a_raw_socket(
    tiny_policy_dir, tmp_path
):
    result = bench_weight_sync(tiny_policy_dir, tmp_path, repeats=1)

    tensors = load_file(tiny_policy_dir / "model.safetensors")  # untied: every tensor once, float32 as trained
    assert result["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert result["tensor_bytes"] == result["bytes"] == sum(result["message_bytes"])
    assert result["parameters"] == sum(t.numel() for t in tensors.values())
    assert len(result["message_bytes"]) >= len(tensors) and max(result["message_bytes"]) <= result["chunk_bytes"]
    for key in ("sync_seconds", "stream_seconds", "raw_seconds", "serialize_seconds", "load_seconds"):
        assert result[key] > 0, key
    assert result["sync_bytes_per_s"] == pytest.approx(result["bytes"] / result["sync_seconds"])
    assert result["raw_bytes_per_s"] == pytest.approx(result["bytes"] / result["raw_seconds"])
    assert result["ratio"] == pytest.approx(result["raw_seconds"] / result["sync_seconds"])


def test_rollouts_generate_the_whole_batch_with_each_replica_count(tiny_policy_dir, tmp_path):
    result = bench_rollouts(tiny_policy_dir, tmp_path, replicas=[1, 2], prompts=8, max_new_tokens=4, repeats=1)

    rows = result["rows"]
    assert [r["replicas"] for r in rows] == [1, 2]
    for row in rows:
        assert row["samples"] == 8  # split across the replicas, every prompt once
        assert 8 <= row["tokens"] <= 8 * 4
        assert row["seconds"] > 0 and row["samples_per_s"] > 0 and row["tokens_per_s"] > 0
        # CPU time is counted in clock ticks (10 ms): a run this small may count none (seen once under load).
        assert row["replica_cores"] >= 0
        assert row["efficiency"] == pytest.approx(row["tokens_per_s"] / (row["replicas"] * rows[0]["tokens_per_s"]))
    assert rows[0]["efficiency"] == 1.0


def test_raw_socket_moves_uneven_message_sizes():
    assert raw_socket_seconds([3, 1 << 20, 5, 70_000], repeats=2) > 0


@pytest.mark.parametrize(("cores", "counts"), [(1, [1, 2]), (2, [1, 2]), (6, [1, 2, 4, 6]), (16, [1, 2, 4, 8, 16])])
def test_replica_counts_go_up_to_the_core_count(cores, counts):
    assert replica_counts(cores) == counts
