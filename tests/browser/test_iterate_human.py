"""People in the loop, end to end: ``rlhf iterate`` with the human labeller, the labelling app as its own process
(``rlhf labeling``, the real CLI), and a person played by Chromium through Playwright, labelling with the keyboard.
Each round waits for her labels; the round's reward model then trains on exactly what she chose."""

from __future__ import annotations

import json
import threading
import time

import pytest
import yaml

from services.labeling.accounts import hash_password
from services.launcher import Launcher
from services.pipeline.config import IterateConfig
from services.pipeline.iterate import run_iterate
from tests.browser.conftest import launch_chromium

pytestmark = pytest.mark.e2e

ROUNDS = 2


def test_a_person_labels_in_the_browser_and_each_round_trains_on_her_labels(tmp_path):
    runs = tmp_path / "runs"
    accounts = tmp_path / "accounts.yaml"
    accounts.write_text(yaml.safe_dump([{"name": "alice", "password": hash_password("alice-password")}]))
    config = IterateConfig.model_validate(
        {
            "run_id": "human",
            "runs_dir": str(runs),
            "pretrain": {"steps": 30},
            "sft": {"demonstrations": 100},
            "preferences": {"samples_per_prompt": 2, "max_new_tokens": 8},
            "labeler": {"kind": "human", "human": {"annotators_per_task": 1, "poll_s": 0.3, "timeout_s": 600}},
            "rounds": {"rounds": ROUNDS, "prompts_per_round": 10},
            "ppo": {"iterations": 2, "prompts_per_iteration": 8, "max_new_tokens": 8},
            "evaluation": {"prompts": 10, "max_new_tokens": 8, "examples": 0},
        }
    )
    outcome: dict = {}

    def iterate():
        try:
            outcome["summary"] = run_iterate(config)
        except BaseException as exc:  # re-raised in the test's thread below
            outcome["error"] = exc

    clicked: list[dict] = []  # what she saw and chose, in original terms: {"prompt", "chosen", "rejected", ...}
    with Launcher(tmp_path / "app") as launcher:
        app = launcher.start(
            "labeling",
            ["labeling"],
            {"port": 0, "runs_dir": str(runs), "accounts_file": str(accounts), "annotators_per_task": 1},
        )
        base = f"http://127.0.0.1:{app.wait_ready(60)['port']}"
        worker = threading.Thread(target=iterate, daemon=True)
        worker.start()
        with launch_chromium() as browser:
            page = browser.new_page()
            page.goto(f"{base}/login")
            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", "alice-password")
            page.click("#password-form button")
            deadline = time.monotonic() + 900
            while worker.is_alive() and time.monotonic() < deadline:
                page.goto(f"{base}/")
                if page.locator("#label-form").count() == 0:  # nothing to label (yet): the loop is sampling or training
                    time.sleep(0.5)
                    continue
                shown = [page.inner_text("#response-a .text"), page.inner_text("#response-b .text")]
                key = "a" if len(clicked) % 3 != 2 else "b"  # mostly A, sometimes B: a pattern to find again
                pick = "ab".index(key)
                clicked.append(
                    {"prompt": page.inner_text("#prompt"), "chosen": shown[pick], "rejected": shown[1 - pick]}
                )
                with page.expect_navigation():
                    page.keyboard.press(key)
        worker.join(60)
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["summary"]
    assert [r["round"] for r in summary["rounds"]] == list(range(ROUNDS + 1))

    def strip(text: str) -> str:
        return " ".join(text.split())  # the page shows the text; compare modulo whitespace rendering

    seen = {(strip(c["prompt"]), strip(c["chosen"]), strip(c["rejected"])) for c in clicked}
    assert len(seen) == len(clicked) > 0
    root = runs / "human"
    trained_on: set = set()
    for number in range(1, ROUNDS + 1):
        labels = [json.loads(line) for line in (root / "data" / f"round{number}_labels.jsonl").open()]
        assert labels and all(x["labeler"] == "human:alice" and x["choice"] in ("a", "b") for x in labels)
        rows = [json.loads(line) for line in (root / "data" / f"round{number}_preferences.jsonl").open()]
        new = {(strip(r["prompt"]), strip(r["chosen"]), strip(r["rejected"])) for r in rows if r["round"] == number}
        held_out = {strip(x["prompt"]) for x in labels if x["held_out"]}
        # Every pair she labelled this round is in the reward model's data, as she chose, unless its prompt is
        # held out for measuring the reward model; and the data holds nothing she did not choose.
        labelled_now = {
            (
                strip(x["prompt"]),
                strip(x["response_a"] if x["choice"] == "a" else x["response_b"]),
                strip(x["response_b"] if x["choice"] == "a" else x["response_a"]),
            )
            for x in labels
        }
        assert labelled_now <= seen
        assert new == {row for row in labelled_now if row[0] not in held_out}
        assert trained_on <= {(strip(r["prompt"]), strip(r["chosen"]), strip(r["rejected"])) for r in rows}
        trained_on |= new
        assert summary["rounds"][number]["preferences_total"] == len(rows)
    assert len(seen) == sum(summary["rounds"][n]["pairs_labelled"] for n in range(1, ROUNDS + 1))
