"""The TRL comparison's project side and the estimators' section run at a tiny size and report consistent figures
(no timing thresholds: these machines are noisy). TRL itself is a bench-only package (requirements-bench.txt) that
`make test` does not install, so its side runs in `make bench` only."""

from __future__ import annotations

import math

from services import bench_trl


def test_the_project_side_runs_the_settings_through_the_services(tmp_path):
    policy, reward, parameters = bench_trl.build_models(tmp_path, hidden=16, layers=1)
    assert parameters > 0
    configs = bench_trl.project_configs(policy, reward, threads={"generation": 1, "reward": 1, "reference": 1})
    trainer = configs["trainer"]
    assert trainer["checkpoint"] == {"root": ""}  # TRL saves nothing either
    assert trainer["ppo"]["minibatch_size"] == trainer["ppo"]["micro_batch_size"] == bench_trl.PROMPTS_PER_ITERATION
    assert trainer["critic"] == {"init": "reward_model", "path": str(reward)}
    assert configs["generation"]["model"]["cpu_threads"] == 1 and trainer["policy"]["cpu_threads"] == 2

    result = bench_trl.run_project(
        policy, reward, 2, tmp_path / "run", threads={"generation": 1, "reward": 1, "reference": 1, "trainer": 1}
    )
    assert set(result.phases) == set(bench_trl.PHASES)
    assert all(seconds > 0 for seconds in result.phases.values())
    assert math.isclose(result.samples_per_second, bench_trl.PROMPTS_PER_ITERATION / result.iteration_seconds)
    assert result.cpu_seconds > 0


def test_the_estimators_section_loads_a_critic_for_gae_only(tmp_path):
    policy, reward, parameters = bench_trl.build_models(tmp_path, hidden=16, layers=1)
    rows = bench_trl.bench_estimators(policy, reward, steps=1)
    assert [r["estimator"] for r in rows] == ["gae", "grpo", "rloo", "reinforce_plus_plus"]
    assert [r["critic"] for r in rows] == [True, False, False, False]
    # Without a critic the trainer keeps the policy's float32 weights, gradients and two AdamW moments: 16 bytes
    # per parameter; GAE adds the critic's.
    for row in rows[1:]:
        assert row["bytes"] == 16 * parameters
        assert row["seconds"] > 0
    assert rows[0]["bytes"] > 16 * parameters
