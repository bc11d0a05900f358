"""The benchmark's wire-format part runs and compares like with like (the loop part is `make bench` only)."""

from __future__ import annotations

from services.bench import bench_codec


def test_codec_bench_measures_both_formats_on_the_same_batch():
    result = bench_codec(rows=4, length=8, repeats=2)
    assert result["packed_ms"] > 0 and result["repeated_ms"] > 0
    # 32 float32 values + 5 offsets either way: the two messages carry the same data.
    assert 32 * 4 <= result["packed_bytes"] < 32 * 4 + 200
    assert 32 * 4 <= result["repeated_bytes"] < 32 * 4 + 200
