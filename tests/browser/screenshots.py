"""Screenshots of the labelling app for the docs: ``python -m tests.browser.screenshots OUT_DIR``.

Serves the app as the browser tests do (uvicorn in a thread, a fresh SQLite store in a temporary directory) on a few
sentence-continuation tasks, lets two annotators label them in Chromium, and writes ``OUT_DIR/labeling-pair.png``
(a comparison), ``labeling-ranking.png`` (a ranking of four, two picked), ``labeling-stats.png`` (the admin's
agreement figures) and ``labeling-signin.png`` (the sign-in page), 1200x800 each."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.browser.conftest import launch_chromium, serve_labeling

PAIRS = [
    {"prompt": "the park was", "responses": ["happy and warm today.", "park was was the the."]},
    {"prompt": "my sister said", "responses": ["she liked the new house.", "she said she said."]},
    {"prompt": "the coffee tasted", "responses": ["bitter but fresh.", "sweet and a bit cold."]},
    {"prompt": "after the rain the street", "responses": ["was shining and quiet.", "street the rain rain."]},
    {"prompt": "the old dog", "responses": ["slept in the sun all day.", "barked at the mailman again."]},
    {"prompt": "our train was", "responses": ["late again this morning.", "on time, which was nice."]},
]
RANKING = {
    "prompt": "the movie was",
    "responses": [
        "funny, and the ending made us smile.",
        "long, but the music was lovely.",
        "movie was was the.",
        "okay.",
    ],
}
# What each annotator decides per pair task, in terms of the original responses ("a": the first is better).
DECISIONS = {
    "alice": ["a", "a", "b", "a", "tie", "b"],
    "bob": ["a", "a", "b", "b", "tie", "b"],
}


def label_pairs(page, name: str) -> None:
    decided = {task["prompt"]: (task["responses"], choice) for task, choice in zip(PAIRS, DECISIONS[name], strict=True)}
    while page.locator("#response-a").count():
        responses, choice = decided[page.text_content("#prompt")]
        if choice in ("a", "b"):
            better = responses["ab".index(choice)]
            key = "a" if page.text_content("#response-a .text") == better else "b"
        else:
            key = {"tie": "t", "both_bad": "x"}[choice]
        with page.expect_navigation():
            page.keyboard.press(key)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve_labeling(Path(tmp), annotators_per_task=2, tasks=[*PAIRS, RANKING], seed=11) as app,
        launch_chromium() as browser,
    ):
        sign_in = app.new_page(browser)
        sign_in.goto(f"{app.url}/login")
        sign_in.screenshot(path=str(out / "labeling-signin.png"))
        alice = app.sign_in(browser, "alice")
        alice.screenshot(path=str(out / "labeling-pair.png"))
        label_pairs(alice, "alice")
        bob = app.sign_in(browser, "bob")
        label_pairs(bob, "bob")

        assert alice.locator("#ranked").count(), "alice should be on the ranking task now"
        alice.keyboard.press("1")
        alice.keyboard.press("3")
        alice.mouse.move(0, 0)
        alice.screenshot(path=str(out / "labeling-ranking.png"))
        for key in ("3", "1", "4", "2"):  # bob ranks all four and submits
            bob.keyboard.press(key)
        with bob.expect_navigation():
            bob.keyboard.press("Enter")
        admin = app.sign_in(browser, "admin")
        admin.goto(f"{app.url}/stats")
        admin.screenshot(path=str(out / "labeling-stats.png"))
    for name in ("labeling-signin.png", "labeling-pair.png", "labeling-ranking.png", "labeling-stats.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
