"""The labelling app's routes through FastAPI's test client (the pages' behaviour in a real browser is in
tests/browser): sign-in, every error the issue names, uploads, the API's token access, start-up refusals."""

from __future__ import annotations

import json
import re
import time
from html import unescape

import pytest
import yaml
from fastapi.testclient import TestClient

from services.labeling.accounts import Accounts, hash_password, hash_token
from services.labeling.app import create_app
from services.labeling.config import LabelingConfig
from services.labeling.store import open_label_store
from shared.config import ConfigError
from shared.store import StoreConfig

TIMEOUT_S = 0.6  # assignment timeout of the late-label test: far above a request's time
ADMIN_TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture
def app_parts(tmp_path):
    accounts = tmp_path / "accounts.yaml"
    accounts.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "admin",
                    "role": "admin",
                    "password": hash_password("admin-pass"),
                    "token_sha256": hash_token(ADMIN_TOKEN),
                },
                {"name": "alice", "password": hash_password("alice-pass")},
                {"name": "bob", "password": hash_password("bob-pass")},
            ]
        )
    )
    config = LabelingConfig(accounts_file=str(accounts), runs_dir=str(tmp_path), annotators_per_task=1)
    store = open_label_store(StoreConfig(), tmp_path, annotators_per_task=1)
    store.add_tasks("b1", [{"prompt": "the park was", "responses": ["happy.", "sad."]}])
    yield config, store, Accounts.load(accounts)
    store.close()


def client(app_parts, name: str | None = None, password: str | None = None) -> TestClient:
    config, store, accounts = app_parts
    c = TestClient(create_app(config, store, accounts))
    if name:
        response = c.post("/login", data={"name": name, "password": password}, follow_redirects=False)
        assert response.status_code == 303, response.text
    return c


def task_on_page(html: str) -> str:
    return re.search(r"/tasks/([^/]+)/label", html).group(1)


def test_sign_in_and_what_needs_it(app_parts):
    anonymous = client(app_parts)
    assert anonymous.get("/", follow_redirects=False).headers["location"] == "/login"
    assert anonymous.get("/api/stats").status_code == 401
    assert anonymous.get("/export/preferences.jsonl").status_code == 401
    assert anonymous.get("/healthz").text == "ok"
    wrong = anonymous.post("/login", data={"name": "alice", "password": "nope"})
    assert wrong.status_code == 401 and "Wrong name, password or token" in wrong.text
    assert anonymous.post("/login", data={"name": "nobody", "password": "x"}).status_code == 401
    by_token = anonymous.post("/login", data={"token": ADMIN_TOKEN}, follow_redirects=False)
    assert by_token.status_code == 303
    # The API also takes an account's token as a bearer token.
    api = client(app_parts)
    assert api.get("/api/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["tasks"] == 1
    assert api.get("/api/stats", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401


def test_label_errors_unknown_not_assigned_double_and_invalid(app_parts):
    alice, bob = client(app_parts, "alice", "alice-pass"), client(app_parts, "bob", "bob-pass")
    tid = task_on_page(alice.get("/").text)
    assert bob.get("/").status_code == 200 and "Nothing left to label" in bob.get("/").text  # 1 annotator per task
    assert bob.post(f"/tasks/{tid}/label", data={"choice": "a"}).status_code == 403
    assert alice.post("/tasks/b1-unknown/label", data={"choice": "a"}).status_code == 404
    assert alice.get("/tasks/b1-unknown").status_code == 404
    invalid = alice.post(f"/tasks/{tid}/label", data={"choice": "c"})
    assert invalid.status_code == 422 and "choice: must be one of" in invalid.text
    assert alice.post(f"/tasks/{tid}/label", data={"choice": "a"}, follow_redirects=False).status_code == 303
    again = alice.post(f"/tasks/{tid}/label", data={"choice": "b"})
    assert again.status_code == 409 and "already labelled by alice" in again.text
    _, store, _ = app_parts
    assert [label.choice for label in store.labels()] != [] and len(store.labels()) == 1
    assert alice.get("/stats").status_code == 403  # admins only


def test_upload_adds_every_row_or_none(app_parts):
    admin = client(app_parts, "admin", "admin-pass")
    good = "\n".join(
        json.dumps(row)
        for row in [
            {"prompt": "p1", "responses": ["a", "b"]},
            {"prompt": "p2", "responses": ["a", "b", "c"]},
        ]
    )
    page = admin.post("/admin/upload", files={"file": ("t.jsonl", good)}, data={"batch": "up1"})
    assert page.status_code == 200 and "Added 2 tasks" in page.text
    split = admin.post("/admin/upload", files={"file": ("t.jsonl", good)}, data={"batch": "up2", "split_pairs": "true"})
    assert "Added 4 tasks" in split.text  # 1 pair + the 3 pairs of the ranking
    bad = good + "\n" + json.dumps({"prompt": "p3", "responses": ["only one"]})
    refused = admin.post("/admin/upload", files={"file": ("t.jsonl", bad)}, data={"batch": "up3"})
    assert refused.status_code == 422 and "line 3: 'responses' must be a list of at least 2 strings" in unescape(
        refused.text
    )
    not_json = admin.post("/admin/upload", files={"file": ("t.jsonl", "{oops")}, data={"batch": "up4"})
    assert not_json.status_code == 422 and "line 1: not JSON" in not_json.text
    _, store, _ = app_parts
    assert {t.batch for t in store.tasks()} == {"b1", "up1", "up2"}  # nothing from the refused files


def test_start_up_refuses_what_cannot_be_safe(tmp_path, app_parts):
    _, store, accounts = app_parts
    with pytest.raises(ConfigError, match="session_secret_file: required"):
        create_app(LabelingConfig(accounts_file="x", host="0.0.0.0"), store, accounts)
    weak = tmp_path / "secret"
    weak.write_text("REPLACE-ME")
    with pytest.raises(ConfigError, match="at least 32 characters"):
        create_app(LabelingConfig(accounts_file="x", session_secret_file=str(weak)), store, accounts)
    bad_accounts = tmp_path / "bad.yaml"
    bad_accounts.write_text(yaml.safe_dump([{"name": "x", "password": "plain-text"}]))
    with pytest.raises(ConfigError, match="must be a scrypt hash"):
        Accounts.load(bad_accounts)


def test_the_session_cookie_is_signed_http_only_and_same_site_strict(app_parts):
    anonymous = client(app_parts)
    response = anonymous.post("/login", data={"name": "alice", "password": "alice-pass"}, follow_redirects=False)
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith("rlhf_labeling=") and "httponly" in cookie and "samesite=strict" in cookie
    assert "secure" not in cookie  # plain HTTP on loopback; on with auth.tls or secure_cookies
    value = cookie.split(";")[0].split("=", 1)[1]
    forged = client(app_parts)
    forged.cookies.set("rlhf_labeling", value[:-4] + "abcd")  # a bad signature is no session
    assert forged.get("/", follow_redirects=False).headers["location"] == "/login"


def test_a_late_label_for_a_task_that_went_to_someone_else_is_refused(tmp_path, app_parts):
    config, _, accounts = app_parts
    store = open_label_store(StoreConfig(), tmp_path / "late", annotators_per_task=1, assignment_timeout_s=TIMEOUT_S)
    store.add_tasks("b1", [{"prompt": "the park was", "responses": ["happy.", "sad."]}])
    app = create_app(config, store, accounts)
    alice, bob = TestClient(app), TestClient(app)
    for who, c in (("alice", alice), ("bob", bob)):
        c.post("/login", data={"name": who, "password": f"{who}-pass"})
    tid = task_on_page(alice.get("/").text)
    time.sleep(TIMEOUT_S + 0.1)  # alice's assignment times out: bob is given the task and labels it
    assert task_on_page(bob.get("/").text) == tid
    assert bob.post(f"/tasks/{tid}/label", data={"choice": "a"}, follow_redirects=False).status_code == 303
    late = alice.post(f"/tasks/{tid}/label", data={"choice": "b"})
    assert late.status_code == 409 and "gone to other annotators" in late.text
    assert [label.annotator for label in store.labels()] == ["bob"]
    store.close()
