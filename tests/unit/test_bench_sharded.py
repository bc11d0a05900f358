"""The sharded-trainer benchmark runs end to end at a tiny size (a real torchrun with 2 gloo ranks) and reports
consistent figures: no timing thresholds (these machines are noisy), but each rank keeps half the tensors."""

from __future__ import annotations

import pytest

from services.bench_sharded import bench


def test_two_ranks_keep_half_the_tensors_of_one_process_and_gather_one_tensor_at_a_time():
    result = bench(hidden=32, layers=2, steps=1)

    one, two = result["rows"]["1 process x 2 threads"], result["rows"]["2 ranks x 1 thread"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    for row in (one, two):
        assert row["seconds"] > 0 and row["peak_rss_bytes"] > 0
        assert 0 < row["largest_gathered_bytes"] < row["whole_policy_bytes"]
    assert two["whole_policy_bytes"] == one["whole_policy_bytes"]
    # FSDP2 shards each parameter along its first dimension, padded to a multiple of the rank count: about half.
    assert two["kept_bytes"] == pytest.approx(one["kept_bytes"] / 2, rel=0.05)
