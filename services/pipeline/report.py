"""``report.md`` and its plots (PNG, matplotlib) for a pipeline run."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from services.pipeline.task import gold_reward

ORDER = ["base", "sft", "ppo", "ppo_no_kl", "dpo"]


Gold = Callable[[str, str], float]


def _per_iteration(run_dir: Path, gold_fn: Gold) -> dict[str, list[float]]:
    """Proxy reward, gold reward (of the same rollouts), KL and beta per PPO iteration."""
    records = [json.loads(line) for line in (run_dir / "iterations.jsonl").read_text().splitlines()]
    gold = defaultdict(list)
    rollouts = run_dir / "rollouts.jsonl"
    if rollouts.exists():
        for line in rollouts.read_text().splitlines():
            row = json.loads(line)
            gold[row["iteration"]].append(gold_fn(row["prompt"], row["response"]))
    return {
        "iteration": [r["iteration"] for r in records],
        "proxy": [r["reward_mean"] for r in records],
        "gold": [statistics.fmean(gold[r["iteration"]]) if gold[r["iteration"]] else float("nan") for r in records],
        "kl": [r["kl"] for r in records],
        "kl_coef": [r["kl_coef"] for r in records],
    }


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here or in a container)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ppo(root: Path, runs: list[str], gold_fn: Gold = gold_reward) -> Path:
    plt = _pyplot()
    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for name in runs:
        curves = _per_iteration(root / name, gold_fn)
        ax_reward.plot(curves["iteration"], curves["proxy"], label=f"{name}: proxy (reward model)")
        ax_reward.plot(curves["iteration"], curves["gold"], linestyle="--", label=f"{name}: gold")
        ax_kl.plot(curves["iteration"], curves["kl"], label=f"{name}: KL")
    ax_reward.set(xlabel="PPO iteration", ylabel="mean reward of the iteration's samples", title="reward")
    ax_kl.set(xlabel="PPO iteration", ylabel="nats per sequence (k1)", title="KL(pi || pi_ref)")
    ax_reward.legend(fontsize=8)
    ax_kl.legend(fontsize=8)
    return _save(plt, fig, root / "ppo_curves.png")


def plot_policies(root: Path, policies: dict) -> Path:
    plt = _pyplot()
    names = [n for n in ORDER if n in policies]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    gold = [policies[n]["gold_reward_mean"] for n in names]
    gold_ci = [policies[n]["gold_reward_ci95"] for n in names]
    proxy = [policies[n]["proxy_reward_mean"] for n in names]
    proxy_ci = [policies[n]["proxy_reward_ci95"] for n in names]
    ax.bar([i - 0.2 for i in x], gold, 0.4, yerr=gold_ci, capsize=4, label="gold reward")
    ax.bar([i + 0.2 for i in x], proxy, 0.4, yerr=proxy_ci, capsize=4, label="proxy (reward model, normalised)")
    ax.set_xticks(list(x), names)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(ylabel="mean on held-out prompts (95% interval)", title="gold vs proxy reward by policy")
    ax.legend(fontsize=8)
    return _save(plt, fig, root / "policies.png")


def write_report(root: Path, summary: dict, gold_fn: Gold = gold_reward) -> Path:
    """``gold_fn(prompt, response)``: the gold reward of the task, for the PPO curves of the rollouts."""
    policies = summary["policies"]
    ppo_runs = [n for n in ("ppo", "ppo_no_kl") if (root / n / "iterations.jsonl").exists()]
    plot_ppo(root, ppo_runs, gold_fn)
    plot_policies(root, policies)
    stages = summary["stages"]
    lines = [
        f"# RLHF pipeline report: {summary['run_id']}",
        "",
        f"Task: {summary['task']}. Evaluation: one sample per held-out prompt "
        f"({next(iter(policies.values()))['prompts']} prompts), same seed for every policy.",
        "",
        "## Policies",
        "",
        "| policy | gold reward (95% CI) | proxy reward (95% CI) | KL to SFT (nats/seq) | length (tokens) | EOS |",
        "|---|---|---|---|---|---|",
    ]
    for name in [n for n in ORDER if n in policies]:
        p = policies[name]
        lines.append(
            f"| {name} | {p['gold_reward_mean']:.3f} ± {p['gold_reward_ci95']:.3f} | "
            f"{p['proxy_reward_mean']:.3f} ± {p['proxy_reward_ci95']:.3f} | {p['kl_to_sft']:.2f} | "
            f"{p['response_length_mean']:.1f} | {p['eos_fraction']:.0%} |"
        )
    rm = stages["reward_model"]
    prefs = stages.get("preferences", {})
    about_labels = prefs.get("description") or (
        f"{prefs.get('pairs', '?')} labelled pairs; where the gold reward differs, the labels agree with it on "
        f"{prefs.get('gold_agreement', float('nan')):.1%} (the simulated labeler is noisy by design)."
    )
    lines += [
        "",
        f"Reward model: held-out pair accuracy {rm['pair_accuracy']:.3f} (before training "
        f"{rm.get('pair_accuracy_first', float('nan')):.3f}), on {rm.get('eval_pairs', '?')} pairs; {about_labels}",
        "",
        "KL to SFT: sum over response tokens of log pi - log pi_sft on the policy's own samples (k1), mean over "
        "prompts. Proxy reward: the reward model's score, normalised by its training mean and std.",
        "",
        "![gold vs proxy reward by policy](policies.png)",
        "",
        "## PPO",
        "",
        "![reward and KL per PPO iteration](ppo_curves.png)",
        "",
    ]
    for name in ppo_runs:
        s = stages[name]
        lines.append(
            f"- {name}: {s['iterations']} iterations, proxy reward {s['reward_mean_first']:.3f} -> "
            f"{s['reward_mean_last']:.3f}, KL last {s['kl_last']:.2f} nats/seq, beta last {s['kl_coef_last']:.4f}, "
            f"{s['seconds_per_iteration']:.2f} s per iteration."
        )
    if "ppo_no_kl" in ppo_runs and "ppo" in policies and "ppo_no_kl" in policies:
        with_kl, without = policies["ppo"], policies["ppo_no_kl"]
        # Hacking: at least as much proxy reward (within its interval) but clearly less gold reward.
        hacked = (
            without["proxy_reward_mean"] >= with_kl["proxy_reward_mean"] - with_kl["proxy_reward_ci95"]
            and without["gold_reward_mean"] + without["gold_reward_ci95"]
            < with_kl["gold_reward_mean"] - with_kl["gold_reward_ci95"]
        )
        verdict = (
            "reward hacking: as much proxy reward without the penalty, clearly less gold reward"
            if hacked
            else "no reward hacking shown by this run (the proxy and the gold reward did not part ways)"
        )
        lines += [
            "",
            f"Without the KL penalty (beta = 0): proxy {without['proxy_reward_mean']:.3f} vs "
            f"{with_kl['proxy_reward_mean']:.3f} with it, gold {without['gold_reward_mean']:.3f} vs "
            f"{with_kl['gold_reward_mean']:.3f}, KL to SFT {without['kl_to_sft']:.1f} vs {with_kl['kl_to_sft']:.1f} "
            f"nats/seq: {verdict}.",
        ]
    lines += ["", "## Samples (held-out prompts)", ""]
    names = [n for n in ORDER if n in policies]
    lines.append("| prompt | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    examples = len(next(iter(policies.values()))["samples"])
    for i in range(examples):
        prompt = policies[names[0]]["samples"][i]["prompt"]
        cells = [
            f"{policies[n]['samples'][i]['response'].strip()} ({policies[n]['samples'][i]['gold']:+.2f})" for n in names
        ]
        lines.append(f"| {prompt} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "(gold reward of each sample in parentheses)", "", "## Stages", ""]
    lines += [f"- {k}: {v:.1f} s" for k, v in summary["seconds"].items()]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
