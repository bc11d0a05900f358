"""The labelling app served for real (uvicorn on a free loopback port, in a thread, over a fresh SQLite label store)
and a real Chromium driven by Playwright, each annotator in a browser context of their own (their own cookies).

``tests/browser/screenshots.py`` starts the app the same way (``serve_labeling``, ``launch_chromium``)."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
import yaml
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from services.labeling.accounts import Accounts, hash_password, hash_token
from services.labeling.app import create_app
from services.labeling.config import LabelingConfig
from services.labeling.store import LabelStore, open_label_store
from shared.store import StoreConfig

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1200, "height": 800}

ADMIN = "admin"
ANNOTATORS = ("alice", "bob", "carol")
PASSWORDS = {name: f"{name}-password-123" for name in (ADMIN, *ANNOTATORS)}
TOKENS = {"carol": "carol-sign-in-token-0123456789abcdefghijklmnopq"}  # carol: a password and a token


@dataclass
class LabelingApp:
    """A running labelling app: its base URL, its store (to look at what was stored) and who may sign in."""

    url: str
    store: LabelStore
    accounts_file: Path
    passwords: dict[str, str] = field(default_factory=lambda: dict(PASSWORDS))
    tokens: dict[str, str] = field(default_factory=lambda: dict(TOKENS))
    contexts: list[BrowserContext] = field(default_factory=list)

    def new_page(self, browser: Browser) -> Page:
        """A page in a new browser context (cookies of its own), not signed in."""
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(15_000)
        self.contexts.append(context)
        return context.new_page()

    def sign_in(self, browser: Browser, name: str) -> Page:
        """A page of ``name``'s own browser context, signed in through the form with name and password."""
        page = self.new_page(browser)
        page.goto(f"{self.url}/login")
        page.fill("#password-form input[name=name]", name)
        page.fill("#password-form input[name=password]", self.passwords[name])
        with page.expect_navigation():
            page.click("#password-form button[type=submit]")
        landing = f"{self.url}/stats" if name == "admin" else f"{self.url}/"  # admins land on the stats
        assert page.url == landing, f"{name} could not sign in: {page.content()[:500]}"
        return page

    def close_contexts(self) -> None:
        for context in self.contexts:
            with contextlib.suppress(Exception):
                context.close()
        self.contexts.clear()


def write_accounts(path: Path) -> Path:
    rows = [{"name": ADMIN, "role": "admin", "password": hash_password(PASSWORDS[ADMIN])}]
    for name in ANNOTATORS:
        row = {"name": name, "role": "annotator", "password": hash_password(PASSWORDS[name])}
        if name in TOKENS:
            row["token_sha256"] = hash_token(TOKENS[name])
        rows.append(row)
    path.write_text(yaml.safe_dump(rows))
    return path


@contextlib.contextmanager
def serve_labeling(
    directory: Path, annotators_per_task: int = 2, tasks: list[dict] | None = None, seed: int = 0
) -> Iterator[LabelingApp]:
    """The app over a fresh SQLite store in ``directory``, served by uvicorn on a free 127.0.0.1 port in a thread.
    ``tasks`` ({"prompt", "responses"} rows) go into batch "test"; ``seed`` fixes the random display orders."""
    directory.mkdir(parents=True, exist_ok=True)
    accounts_file = write_accounts(directory / "accounts.yaml")
    config = LabelingConfig(
        accounts_file=str(accounts_file), runs_dir=str(directory / "runs"), annotators_per_task=annotators_per_task
    )
    store = open_label_store(StoreConfig(), config.runs_dir, annotators_per_task=annotators_per_task)
    store.rng = random.Random(seed)
    if tasks:
        store.add_tasks("test", tasks)
    app = create_app(config, store, Accounts.load(accounts_file))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="labeling-app", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            store.close()
            raise RuntimeError("the labelling app did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    running = LabelingApp(f"http://127.0.0.1:{port}", store, accounts_file)
    try:
        yield running
    finally:
        running.close_contexts()
        server.should_exit = True
        thread.join(15)
        store.close()


@contextlib.contextmanager
def launch_chromium() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test`, which installs Debian's chromium", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium for the module's tests (each test makes its own contexts).

    Module scope, not session: between its calls Playwright's sync API leaves its event loop set as the thread's
    running loop, so a browser kept open for the session would break every later asyncio test in the same run
    ("Cannot run the event loop while another loop is running") and any other module's ``sync_playwright()``."""
    with launch_chromium() as launched:
        yield launched


@pytest.fixture
def labeling(tmp_path):
    """``labeling(annotators_per_task=2, tasks=[...], seed=0)``: starts an app (see ``serve_labeling``); all are
    stopped, and their browser contexts closed, after the test."""
    with contextlib.ExitStack() as stack:
        count = 0

        def start(annotators_per_task: int = 2, tasks: list[dict] | None = None, seed: int = 0) -> LabelingApp:
            nonlocal count
            count += 1
            return stack.enter_context(serve_labeling(tmp_path / f"app{count}", annotators_per_task, tasks, seed))

        yield start
