"""The labelling app in a real browser (Chromium through Playwright): people sign in, label by clicking and by keys,
and what comes out (the exports, the stats page) is what they did, mapped back through the order they were shown."""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction
from pathlib import Path

import krippendorff
import numpy as np
import pytest
from playwright.sync_api import Page

from services.labeling.store import PAIR_CHOICES

BUTTONS = {"a": "#choose-a", "b": "#choose-b", "tie": "#choose-tie", "both_bad": "#choose-both-bad"}
KEYS = {"a": "a", "1": "a", "b": "b", "2": "b", "t": "tie", "x": "both_bad"}  # pair page: key -> choice as shown

PAIRS = [
    {"prompt": "the park was", "responses": ["happy and warm today.", "park park was the."]},
    {"prompt": "my sister said", "responses": ["she liked the new house.", "said said my my."]},
    {"prompt": "the coffee tasted", "responses": ["bitter but fresh.", "sweet and a bit cold."]},
    {"prompt": "after the rain the street", "responses": ["was shining and quiet.", "the the street."]},
    {"prompt": "the old dog", "responses": ["slept in the sun all day.", "dog old the old."]},
    {"prompt": "our train was", "responses": ["late again this morning.", "on time, which was nice."]},
]
RANKING = {
    "prompt": "the movie was",
    "responses": ["funny, and the ending made us smile.", "long, but the music was lovely.", "movie was was.", "okay."],
}


def norm(text: str) -> str:
    return " ".join(text.split())


def shown_pair(page: Page) -> tuple[str, str, str]:
    """(prompt, text shown at A, text shown at B) of the pair page that is open."""
    return page.text_content("#prompt"), page.text_content("#response-a .text"), page.text_content("#response-b .text")


def posts(page: Page) -> list[str]:
    """A live list of the URLs of the POST requests the page sends from now on."""
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url) if request.method == "POST" else None)
    return sent


def type_comment(page: Page, text: str) -> None:
    """Types into the comment box; the letters and digits that are keys elsewhere on the page submit nothing."""
    sent = posts(page)
    url = page.url
    page.click("#comment")
    page.keyboard.type(text)
    page.wait_for_timeout(150)  # a keydown that submitted would have sent its POST by now
    assert sent == [] and page.url == url
    assert page.input_value("#comment") == text
    page.click("#prompt")  # out of the box: keys act again


def label_pair(page: Page, how: str, key: str, comment: str = "") -> str:
    """Labels the open pair task by clicking a button (``how="click"``, key = a choice) or pressing a key; returns
    the choice in terms of what was shown (a = the response shown at A)."""
    if comment:
        type_comment(page, comment)
    choice = key if how == "click" else KEYS[key]
    with page.expect_navigation() as navigation:
        if how == "click":
            page.click(BUTTONS[key])
        else:
            page.keyboard.press(key)
    assert navigation.value.status == 200 and page.locator("#error").count() == 0, page.content()[:800]
    return choice


def get_jsonl(page: Page, url: str) -> list[dict]:
    response = page.request.get(url)
    assert response.status == 200, response.text()
    return [json.loads(line) for line in response.text().splitlines()]


def multiset(rows: list[dict]) -> Counter:
    return Counter(json.dumps(row, sort_keys=True) for row in rows)


# -- signing in --------------------------------------------------------------------------------------------------------


def test_sign_in_by_password_and_by_token_and_pages_need_it(browser, labeling):
    app = labeling(tasks=PAIRS[:1])
    page = app.new_page(browser)
    for path in ("/", "/stats", f"/tasks/{app.store.tasks()[0].id}", "/admin/upload"):
        page.goto(app.url + path)
        assert page.url == f"{app.url}/login", path  # redirected to the sign-in page
    assert page.locator("#error").count() == 0
    assert page.request.get(f"{app.url}/export/preferences.jsonl").status == 401  # the API: 401, no redirect

    # a wrong password, an unknown name, a wrong token: the error, still signed out
    for name, password in (("alice", "not-her-password"), ("mallory", app.passwords["alice"])):
        page.fill("#password-form input[name=name]", name)
        page.fill("#password-form input[name=password]", password)
        with page.expect_navigation() as navigation:
            page.click("#password-form button[type=submit]")
        assert navigation.value.status == 401
        assert page.text_content("#error") == "Wrong name, password or token."
    page.fill("#token-form input[name=token]", "x" * 40)
    with page.expect_navigation():
        page.click("#token-form button[type=submit]")
    assert page.text_content("#error") == "Wrong name, password or token."
    page.goto(f"{app.url}/")
    assert page.url == f"{app.url}/login"

    # name and password
    page.fill("#password-form input[name=name]", "alice")
    page.fill("#password-form input[name=password]", app.passwords["alice"])
    with page.expect_navigation():
        page.click("#password-form button[type=submit]")
    assert page.url == f"{app.url}/"
    assert page.text_content("header .muted") == "alice"
    assert page.text_content("#prompt") == PAIRS[0]["prompt"]  # her first task
    with page.expect_navigation():
        page.click("header form button")  # sign out
    page.goto(f"{app.url}/")
    assert page.url == f"{app.url}/login"

    # the token alone, in another browser
    other = app.new_page(browser)
    other.goto(f"{app.url}/login")
    other.fill("#token-form input[name=token]", app.tokens["carol"])
    with other.expect_navigation():
        other.click("#token-form button[type=submit]")
    assert other.url == f"{app.url}/"
    assert other.text_content("header .muted") == "carol"
    assert other.text_content("#prompt") == PAIRS[0]["prompt"]
    assert "Stats" not in other.text_content("header nav")  # an annotator: no admin links


def test_annotators_get_403_on_the_stats_and_exports(browser, labeling):
    app = labeling(tasks=PAIRS[:1])
    alice = app.sign_in(browser, "alice")
    response = alice.goto(f"{app.url}/stats")
    assert response.status == 403
    assert alice.text_content("#error") == "this page is for admins"
    for path in ("/api/stats", "/export/preferences.jsonl", "/export/rankings.jsonl", "/admin/upload"):
        assert alice.request.get(app.url + path).status == 403, path
    # a token of an annotator's account works as a bearer token, and is no admin either
    bearer = {"Authorization": f"Bearer {app.tokens['carol']}"}
    assert alice.request.get(f"{app.url}/api/stats", headers=bearer).status == 403
    admin = app.sign_in(browser, "admin")
    assert admin.goto(f"{app.url}/stats").status == 200
    assert admin.text_content("#tasks") == "1"


# -- pair tasks: what was clicked is what is exported --------------------------------------------------------------

# Per annotator, one action per task, in the order the tasks come: ("click", choice) or ("key", key), and a comment.
PLAN = {
    "alice": [("click", "a", ""), ("key", "2", ""), ("key", "t", ""), ("click", "b", "at best a tie, but B wins")],
    "bob": [("key", "a", ""), ("click", "tie", ""), ("key", "1", ""), ("key", "b", "1 2 a b t x: B reads better")],
    "carol": [("key", "b", ""), ("key", "x", "both bad, a and b"), ("click", "a", ""), ("click", "both_bad", "")],
}


def test_the_preference_export_is_exactly_what_each_annotator_clicked(browser, labeling):
    tasks = PAIRS[:4]
    app = labeling(annotators_per_task=3, tasks=tasks, seed=1)
    pages = {name: app.sign_in(browser, name) for name in PLAN}
    responses = {t["prompt"]: t["responses"] for t in tasks}
    did = []  # (annotator, prompt, shown at A, shown at B, choice as shown, comment), in the order labelled
    for step in range(len(tasks)):
        for name, page in pages.items():  # interleaved: all three hold assignments of the same tasks
            how, key, comment = PLAN[name][step]
            prompt, a, b = shown_pair(page)
            assert sorted([a, b]) == sorted(responses[prompt])
            did.append((name, prompt, a, b, label_pair(page, how, key, comment), comment))
    for page in pages.values():
        assert page.locator("#done").count() == 1  # each labelled all four, then nothing is left

    # every label as stored: in terms of the original responses, with the order shown and the comment
    labels = {(x.annotator, x.task_id): x for x in app.store.labels()}
    by_prompt = {t.prompt: t for t in app.store.tasks()}
    assert len(labels) == len(did) == 12
    for name, prompt, a, b, choice, comment in did:
        task = by_prompt[prompt]
        label = labels[(name, task.id)]
        assert [task.responses[i] for i in label.order] == [a, b]
        picked = {"a": a, "b": b}.get(choice)
        expected = choice if picked is None else "ab"[task.responses.index(picked)]
        assert (label.choice, label.comment) == (expected, comment)
    orders = {tuple(x.order) for x in labels.values()}
    assert orders == {(0, 1), (1, 0)}, "both display orders must occur, or the mapping back is not tested"

    # the export, downloaded by the admin from the stats page: one row per A/B click, chosen = the text in the box
    # the annotator picked; ties and "both bad" give no row
    expected_rows = [
        {"prompt": prompt, "chosen": a if choice == "a" else b, "rejected": b if choice == "a" else a}
        for _, prompt, a, b, choice, _ in did
        if choice in ("a", "b")
    ]
    assert len(expected_rows) == 8
    admin = app.sign_in(browser, "admin")
    admin.goto(f"{app.url}/stats")
    with admin.expect_download() as download:
        admin.click('a[href="/export/preferences.jsonl"]')
    assert download.value.suggested_filename == "preferences.jsonl"
    rows = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert multiset(rows) == multiset(expected_rows)
    assert multiset(get_jsonl(admin, f"{app.url}/export/preferences.jsonl")) == multiset(expected_rows)

    # rankings export: a decided pair is a ranking of two
    ranked = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]} for r in expected_rows]
    assert multiset(get_jsonl(admin, f"{app.url}/export/rankings.jsonl")) == multiset(ranked)


# -- ranking tasks ---------------------------------------------------------------------------------------------------


def shown_ranking(page: Page) -> list[str]:
    count = page.locator(".response").count()
    return [page.text_content(f"#response-{i} .text") for i in range(1, count + 1)]


def chips(page: Page) -> list[str]:
    return page.locator("#ranked .chip").all_text_contents()


def test_a_ranking_by_keys_and_by_clicks_is_exported_in_the_order_picked(browser, labeling):
    app = labeling(annotators_per_task=2, tasks=[RANKING], seed=3)

    # alice, by keys: 3, 1, 4, Backspace (undoes the 4), Enter too early (nothing), 2, 4, Enter
    alice = app.sign_in(browser, "alice")
    sent = posts(alice)
    shown_to_alice = shown_ranking(alice)
    assert sorted(shown_to_alice) == sorted(RANKING["responses"])
    assert alice.is_disabled("#submit-ranking")
    for key in ("3", "1", "4"):
        alice.keyboard.press(key)
    assert chips(alice) == ["Response 3", "Response 1", "Response 4"]
    alice.keyboard.press("Backspace")
    assert chips(alice) == ["Response 3", "Response 1"]
    alice.keyboard.press("1")  # already ranked: ignored
    alice.keyboard.press("Enter")  # not all ranked yet: nothing is sent
    alice.wait_for_timeout(150)
    assert sent == [] and chips(alice) == ["Response 3", "Response 1"]
    alice.keyboard.press("2")
    alice.keyboard.press("4")
    assert chips(alice) == ["Response 3", "Response 1", "Response 2", "Response 4"]
    assert alice.is_enabled("#submit-ranking")
    with alice.expect_navigation():
        alice.keyboard.press("Enter")
    assert alice.locator("#done").count() == 1
    alice_ranked = [shown_to_alice[p] for p in (2, 0, 1, 3)]

    # bob, by clicks on the responses: 2, 4, (undo) 1, 4, 3, then the submit button
    bob = app.sign_in(browser, "bob")
    shown_to_bob = shown_ranking(bob)
    for number in (2, 4):
        bob.click(f"#response-{number}")
    bob.click("#undo")
    for number in (1, 4, 3):
        bob.click(f"#response-{number}")
    assert chips(bob) == ["Response 2", "Response 1", "Response 4", "Response 3"]
    with bob.expect_navigation():
        bob.click("#submit-ranking")
    assert bob.locator("#done").count() == 1
    bob_ranked = [shown_to_bob[p] for p in (1, 0, 3, 2)]

    # the labels, stored in terms of the original responses
    labels = {x.annotator: x for x in app.store.labels()}
    for name, ranked in (("alice", alice_ranked), ("bob", bob_ranked)):
        assert [RANKING["responses"][i] for i in labels[name].ranking] == ranked
    assert labels["alice"].order != labels["bob"].order  # shown in different orders (seeded)

    admin = app.sign_in(browser, "admin")
    rows = get_jsonl(admin, f"{app.url}/export/rankings.jsonl")
    assert rows == [
        {"prompt": RANKING["prompt"], "responses": alice_ranked},
        {"prompt": RANKING["prompt"], "responses": bob_ranked},
    ]
    # and as preferences: every pair of each ranking, the better one chosen (C(4, 2) = 6 rows per label)
    expected = [
        {"prompt": RANKING["prompt"], "chosen": ranked[i], "rejected": ranked[j]}
        for ranked in (alice_ranked, bob_ranked)
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    assert multiset(get_jsonl(admin, f"{app.url}/export/preferences.jsonl")) == multiset(expected)


# -- assignment: never twice to the same annotator ---------------------------------------------------------------


def test_each_task_goes_to_two_different_annotators_and_never_twice_to_one(browser, labeling):
    app = labeling(annotators_per_task=2, tasks=PAIRS[:3], seed=5)
    first, second, third = (t["prompt"] for t in PAIRS[:3])
    # Signing in opens "/": alice and bob are given the first task; it is then held by two, so carol gets the second.
    alice, bob, carol = (app.sign_in(browser, name) for name in ("alice", "bob", "carol"))
    assert [p.text_content("#prompt") for p in (alice, bob, carol)] == [first, first, second]

    # alice labels all three (the second is held by carol alone: one place is free), then has nothing left,
    # although no task has its two labels yet: none is given to her twice
    seen_by_alice = []
    for key in ("a", "b", "1"):
        seen_by_alice.append(alice.text_content("#prompt"))
        label_pair(alice, "key", key)
    assert seen_by_alice == [first, second, third]
    assert alice.locator("#done").count() == 1
    assert "You have labelled 3" in alice.text_content("#done")
    alice.reload()
    assert alice.locator("#done").count() == 1

    # bob labels the first; the second is full (alice's label, carol's assignment): he is given the third
    label_pair(bob, "click", "b")
    assert bob.text_content("#prompt") == third
    # carol labels the second; the first two have their labels, the third alice's label and bob's assignment:
    # nothing is left for her
    label_pair(carol, "key", "t")
    assert carol.locator("#done").count() == 1
    label_pair(bob, "key", "2")
    for page in (alice, bob, carol):
        page.goto(f"{app.url}/")
        assert page.locator("#done").count() == 1

    labels = app.store.labels()
    assert len(labels) == 6
    for task in app.store.tasks():
        annotators = [x.annotator for x in labels if x.task_id == task.id]
        assert len(annotators) == len(set(annotators)) == 2, f"{task.prompt}: {annotators}"
    assert Counter(x.annotator for x in labels) == {"alice": 3, "bob": 2, "carol": 1}
    assert app.store.queue_size() == 0


def test_a_third_annotator_who_comes_late_sees_the_done_page(browser, labeling):
    app = labeling(annotators_per_task=2, tasks=PAIRS[:3], seed=6)
    for name in ("alice", "bob"):
        page = app.sign_in(browser, name)
        for key in ("a", "x", "2"):
            label_pair(page, "key", key)
        assert page.locator("#done").count() == 1
    carol = app.sign_in(browser, "carol")
    assert carol.locator("#done").count() == 1
    assert carol.locator("#label-form").count() == 0
    labels = app.store.labels()
    assert len(labels) == 6
    for task in app.store.tasks():
        assert sorted(x.annotator for x in labels if x.task_id == task.id) == ["alice", "bob"]


# -- the stats page against a hand computation -------------------------------------------------------------------

# What each annotator decides, in terms of the ORIGINAL responses of PAIRS[i] ("a" = responses[0] is better); the
# test finds, on the page, where that response is shown and picks that box.
DESIGN = {
    "alice": ["a", "a", "b", "b", "tie", "a"],
    "bob": ["a", "a", "b", "a", "tie", "b"],
    "carol": ["a", "b", "b", "tie", "both_bad", "a"],
}


def test_the_stats_page_shows_kappa_alpha_and_majority_agreement_as_computed_by_hand(browser, labeling):
    app = labeling(annotators_per_task=3, tasks=[*PAIRS, RANKING], seed=7)
    responses = {t["prompt"]: t["responses"] for t in PAIRS}
    index = {t["prompt"]: i for i, t in enumerate(PAIRS)}
    pages = {name: app.sign_in(browser, name) for name in DESIGN}
    for step in range(len(PAIRS)):
        for number, (name, page) in enumerate(pages.items()):
            prompt, a, b = shown_pair(page)
            decided = DESIGN[name][index[prompt]]
            if decided in ("a", "b"):
                better = responses[prompt]["ab".index(decided)]
                shown = "ab"[[a, b].index(better)]  # the box where the better response is shown
            else:
                shown = decided
            if (step + number) % 2:
                label_pair(page, "click", shown)
            else:
                label_pair(page, "key", {"a": "a", "b": "2", "tie": "t", "both_bad": "x"}[shown])
    stored = {(x.annotator, x.task_id): x.choice for x in app.store.labels()}
    by_prompt = {t.prompt: t.id for t in app.store.tasks()}
    assert stored == {(name, by_prompt[t["prompt"]]): DESIGN[name][i] for name in DESIGN for i, t in enumerate(PAIRS)}

    # Cohen's kappa = (p_o - p_e) / (1 - p_e), by hand. alice & bob (6 shared tasks):
    #   agree on tasks 1, 2, 3, 5: p_o = 4/6
    #   alice: a 3, b 2, tie 1; bob: a 3, b 2, tie 1 -> p_e = (3*3 + 2*2 + 1*1) / 6^2 = 14/36
    #   kappa = (24/36 - 14/36) / (22/36) = 10/22 = 5/11
    kappa_ab = (Fraction(4, 6) - Fraction(14, 36)) / (1 - Fraction(14, 36))
    assert kappa_ab == Fraction(5, 11)
    # alice & carol: agree on 1, 3, 6: p_o = 3/6; carol: a 2, b 2, tie 1, both_bad 1
    #   p_e = (3*2 + 2*2 + 1*1 + 0*1) / 36 = 11/36; kappa = (18/36 - 11/36) / (25/36) = 7/25
    kappa_ac = (Fraction(3, 6) - Fraction(11, 36)) / (1 - Fraction(11, 36))
    assert kappa_ac == Fraction(7, 25)
    # bob & carol: agree on 1, 3: p_o = 2/6; p_e = (3*2 + 2*2 + 1*1) / 36 = 11/36; kappa = (12 - 11) / 25 = 1/25
    kappa_bc = (Fraction(2, 6) - Fraction(11, 36)) / (1 - Fraction(11, 36))
    assert kappa_bc == Fraction(1, 25)
    kappa_mean = (kappa_ab + kappa_ac + kappa_bc) / 3
    assert kappa_mean == Fraction(71, 275)

    # Krippendorff's alpha (nominal), by hand with the coincidence matrix: 18 values, all tasks have 3 labels.
    #   off-diagonal coincidences: a-b 2.5 (task 2: 1, task 4: .5, task 6: 1), a-tie .5, b-tie .5, tie-both_bad 1,
    #   each counted both ways: 9; value counts a 8, b 6, tie 3, both_bad 1 -> sum over c != k of n_c n_k
    #   = 18^2 - (64 + 36 + 9 + 1) = 214; alpha = 1 - (n - 1) * 9 / 214 = 1 - 153/214 = 61/214
    alpha = Fraction(61, 214)
    codes = {c: i for i, c in enumerate(PAIR_CHOICES)}
    matrix = np.array([[codes[c] for c in DESIGN[name]] for name in DESIGN], dtype=float)
    assert krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal") == pytest.approx(float(alpha))

    # majority of the others (leave-self-out; with three annotators the other two must agree):
    #   alice: tasks 1, 3 count (bob and carol agree), she agrees on both: 2/2
    #   bob: tasks 1, 3, 6 (alice and carol: a, b, a), he agrees on 1 and 3: 2/3
    #   carol: tasks 1, 2, 3, 5 (alice and bob: a, a, b, tie), she agrees on 1 and 3: 2/4
    majority = {"alice": (1.0, 2), "bob": (2 / 3, 3), "carol": (0.5, 4)}

    admin = app.sign_in(browser, "admin")
    assert admin.goto(f"{app.url}/stats").status == 200
    assert admin.text_content("#tasks") == "7"
    assert admin.text_content("#queue") == "1"  # the ranking task: nobody labelled it
    assert admin.text_content("#labels") == "18"
    assert admin.text_content("#alpha") == f"{float(alpha):.3f}" == "0.285"
    assert admin.text_content("#kappa-mean") == f"{float(kappa_mean):.3f}" == "0.258"
    for pair, kappa in (("alice+bob", kappa_ab), ("alice+carol", kappa_ac), ("bob+carol", kappa_bc)):
        row = admin.locator(f'tr[data-pair="{pair}"]')
        assert row.locator("td.kappa").text_content() == f"{float(kappa):.3f}"
        assert row.locator("td").nth(1).text_content() == "6"  # shared comparisons
    for name, (share, count) in majority.items():
        cell = admin.locator(f'tr[data-annotator="{name}"] td.majority').text_content()
        assert norm(cell) == f"{share:.3f} ({count} tasks)"
    assert admin.locator("tr[data-annotator]").count() == 3

    api = admin.request.get(f"{app.url}/api/stats").json()
    assert api["krippendorff_alpha"] == pytest.approx(float(alpha))
    assert api["cohen_kappa_mean"] == pytest.approx(float(kappa_mean))
    assert {"+".join(k["annotators"]): k["kappa"] for k in api["cohen_kappa"]} == pytest.approx(
        {"alice+bob": float(kappa_ab), "alice+carol": float(kappa_ac), "bob+carol": float(kappa_bc)}
    )
    for name, (share, count) in majority.items():
        assert api["annotators"][name]["majority_agreement"] == pytest.approx(share)
        assert api["annotators"][name]["majority_tasks"] == count
    assert api["choices"] == {"a": 8, "b": 6, "tie": 3, "both_bad": 1}


# -- a second submission -------------------------------------------------------------------------------------------


def test_submitting_an_old_form_again_is_refused_and_changes_nothing(browser, labeling):
    app = labeling(annotators_per_task=2, tasks=PAIRS[:2], seed=8)
    alice = app.sign_in(browser, "alice")
    first_prompt, a, b = shown_pair(alice)
    # Her task at its own address (as a link or a bookmark opens it). Going back to "/" instead shows the browser's
    # latest copy of "/", i.e. her next task, unless the browser keeps whole pages (Chrome's back-forward cache,
    # which Playwright turns off); at /tasks/{id}, Back shows the old form from the HTTP cache.
    tid = next(t.id for t in app.store.tasks() if t.prompt == first_prompt)
    assert alice.goto(f"{app.url}/tasks/{tid}").status == 200
    assert shown_pair(alice) == (first_prompt, a, b)
    label_pair(alice, "click", "a")
    assert alice.text_content("#prompt") == PAIRS[1]["prompt"]  # on to the next task
    before = app.store.labels()
    assert len(before) == 1

    alice.go_back()  # the form of the task she has just labelled, as the browser kept it
    assert shown_pair(alice) == (first_prompt, a, b)
    with alice.expect_navigation() as navigation:
        alice.click("#choose-b")
    assert navigation.value.status == 409
    assert "already labelled by alice" in alice.text_content("#error")
    alice.go_back()
    with alice.expect_navigation() as navigation:
        alice.keyboard.press("t")  # by key: the same
    assert navigation.value.status == 409
    assert app.store.labels() == before  # her label is the one she gave first

    # the same form posted straight to the app: 409 too; and her current task is still hers to label
    response = alice.request.post(f"{app.url}/tasks/{tid}/label", form={"choice": "b"})
    assert response.status == 409
    assert alice.goto(f"{app.url}/tasks/{tid}").status == 409  # and opened afresh, the task says so
    alice.goto(f"{app.url}/")
    assert alice.text_content("#prompt") == PAIRS[1]["prompt"]
    label_pair(alice, "key", "b")
    assert len(app.store.labels()) == 2 and app.store.labels()[0] == before[0]
