"""The run store's contract, held by SQLite and by a real redis-server alike; then each backend's durability."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY

from shared.config import ConfigError, StrictModel, load_config
from shared.errors import InvalidInput
from shared.store import (
    RedisStore,
    SqliteStore,
    StoreConfig,
    StoreUnavailable,
    check_run_id,
    open_store,
)
from tests.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]


def store_up() -> float | None:
    return REGISTRY.get_sample_value("rlhf_store_up")


@pytest.fixture(params=["sqlite", "redis"])
def open_backend(request, tmp_path):
    """Opens a new store object on the test's backend: the same file, or the same redis-server, each call."""
    if request.param == "sqlite":

        def make():
            return SqliteStore(tmp_path / "state.sqlite3")
    else:
        server = request.getfixturevalue("redis_server")

        def make():
            return RedisStore(server.url, outage_budget_s=10, key_prefix="test")

    opened = []

    def open_one():
        opened.append(make())
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_backend):
    return open_backend()


def test_runs_listed_in_creation_order(store):
    store.put_run("b", {"name": "b", "state": "created"})
    store.put_run("a", {"name": "a"})
    store.put_run("c", {"name": "c", "nested": {"seeds": [1, 2], "ok": True, "none": None}})
    store.put_run("b", {"name": "b", "state": "running"})  # replaced, keeps its place
    assert store.get_run("b") == {"name": "b", "state": "running"}
    assert store.get_run("missing") is None
    assert store.list_runs() == [
        {"name": "b", "state": "running"},
        {"name": "a"},
        {"name": "c", "nested": {"seeds": [1, 2], "ok": True, "none": None}},
    ]


def test_commit_iteration_stores_record_and_document_and_replaces_same_iteration(store):
    store.put_run("r", {"iteration": -1})
    store.commit_iteration("r", 0, {"iteration": 0, "reward": 0.1}, {"iteration": 0})
    store.commit_iteration("r", 1, {"iteration": 1, "reward": 0.2}, {"iteration": 1})
    store.commit_iteration("r", 1, {"iteration": 1, "reward": 0.3}, {"iteration": 1, "again": True})
    assert store.iterations("r") == [{"iteration": 0, "reward": 0.1}, {"iteration": 1, "reward": 0.3}]
    assert store.get_run("r") == {"iteration": 1, "again": True}
    assert store.iterations("other") == []


def test_commit_iteration_creates_the_run(store):
    store.commit_iteration("fresh", 0, {"iteration": 0}, {"state": "running"})
    assert store.list_runs() == [{"state": "running"}]


def test_iterations_in_numeric_order(store):
    for iteration in (10, 9, 2, 100, 1):
        store.commit_iteration("r", iteration, {"iteration": iteration}, {"latest": iteration})
    assert [record["iteration"] for record in store.iterations("r")] == [1, 2, 9, 10, 100]


def test_a_reader_never_sees_a_document_ahead_of_its_record(open_backend):
    """Records are read before the document: with both written atomically, the document's iteration is always at
    least the newest record's."""
    writer, reader = open_backend(), open_backend()
    writer.put_run("r", {"latest": -1})
    done = threading.Event()

    def commit_many():
        for iteration in range(150):
            writer.commit_iteration("r", iteration, {"iteration": iteration}, {"latest": iteration})
        done.set()

    thread = threading.Thread(target=commit_many)
    thread.start()
    while not done.is_set():
        records = reader.iterations("r")
        latest = reader.get_run("r")["latest"]
        assert not records or records[-1]["iteration"] <= latest
    thread.join()
    assert len(reader.iterations("r")) == 150


def test_steps_round_trip_binary(store):
    every_byte = bytes(range(256))
    large = os.urandom(5 * 1024 * 1024)
    store.put_step("r", 10, every_byte)
    store.put_step("r", 2, large)
    store.put_step("r", 9, b"")
    assert store.get_step("r", 10) == every_byte
    assert store.get_step("r", 2) == large
    assert store.get_step("r", 9) == b""
    assert store.get_step("r", 3) is None
    assert store.steps("r") == [2, 9, 10]
    store.put_step("r", 10, b"\x00replaced")
    assert store.get_step("r", 10) == b"\x00replaced"
    assert store.steps("other") == []


def test_prune_steps(store):
    for iteration in range(1, 6):
        store.put_step("r", iteration, bytes([iteration]))
    store.put_step("other", 1, b"x")
    store.prune_steps("r", 3)
    assert store.steps("r") == [4, 5]
    assert store.get_step("r", 4) == bytes([4])
    assert store.steps("other") == [1]
    store.prune_steps("r", 0)
    assert store.steps("r") == [4, 5]


def test_delete_run(store):
    for run_id in ("a", "b"):
        store.put_run(run_id, {"name": run_id})
        store.commit_iteration(run_id, 0, {"iteration": 0}, {"name": run_id, "iteration": 0})
        store.put_step(run_id, 1, b"step")
    store.delete_run("a")
    assert store.get_run("a") is None
    assert store.iterations("a") == []
    assert store.steps("a") == []
    assert store.list_runs() == [{"name": "b", "iteration": 0}]
    assert store.steps("b") == [1]
    store.delete_run("never-existed")
    store.put_run("a", {"name": "a"})  # created again: now the newest
    assert [doc["name"] for doc in store.list_runs()] == ["b", "a"]


BAD_RUN_IDS = ["", "-lead", ".hidden", "a/b", "../up", "a b", "run:1", "é", "a" * 129, None, 7]


@pytest.mark.parametrize("run_id", BAD_RUN_IDS)
def test_bad_run_ids_rejected(store, run_id):
    calls = [
        lambda: store.put_run(run_id, {}),
        lambda: store.get_run(run_id),
        lambda: store.commit_iteration(run_id, 0, {}, {}),
        lambda: store.iterations(run_id),
        lambda: store.put_step(run_id, 0, b""),
        lambda: store.get_step(run_id, 0),
        lambda: store.steps(run_id),
        lambda: store.prune_steps(run_id, 0),
        lambda: store.delete_run(run_id),
    ]
    for call in calls:
        with pytest.raises(InvalidInput) as caught:
            call()
        assert caught.value.field == "run_id"
    assert store.list_runs() == []


def test_good_run_ids():
    for run_id in ("a", "0", "run-1.2_3", "A" * 128):
        assert check_run_id(run_id) == run_id


def test_bad_iteration_rejected(store):
    for iteration in (-1, 1.5, "3", True):
        with pytest.raises(InvalidInput, match="iteration"):
            store.commit_iteration("r", iteration, {}, {})
        with pytest.raises(InvalidInput, match="iteration"):
            store.put_step("r", iteration, b"")
    assert store.get_run("r") is None


def test_survives_close_and_reopen(open_backend):
    store = open_backend()
    store.put_run("r", {"state": "running"})
    store.commit_iteration("r", 3, {"iteration": 3}, {"state": "running", "iteration": 3})
    store.put_step("r", 4, b"\x00\xff")
    store.close()
    reopened = open_backend()
    assert reopened.list_runs() == [{"state": "running", "iteration": 3}]
    assert reopened.iterations("r") == [{"iteration": 3}]
    assert reopened.get_step("r", 4) == b"\x00\xff"


def test_many_threads_one_store(store):
    def work(worker: int):
        run_id = f"run-{worker}"
        store.put_run(run_id, {"worker": worker})
        for iteration in range(10):
            store.put_step(run_id, iteration, bytes([worker, iteration]))
            store.commit_iteration(run_id, iteration, {"iteration": iteration}, {"worker": worker, "at": iteration})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert sorted(doc["worker"] for doc in store.list_runs()) == list(range(8))
    for worker in range(8):
        assert store.get_run(f"run-{worker}") == {"worker": worker, "at": 9}
        assert store.steps(f"run-{worker}") == list(range(10))
        assert len(store.iterations(f"run-{worker}")) == 10


# SQLite


def test_sqlite_two_stores_on_one_file(tmp_path):
    first, second = SqliteStore(tmp_path / "s.sqlite3"), SqliteStore(tmp_path / "s.sqlite3")
    first.put_run("a", {"by": "first"})
    second.commit_iteration("a", 0, {"iteration": 0}, {"by": "second"})
    assert first.get_run("a") == {"by": "second"}
    assert first.iterations("a") == [{"iteration": 0}]
    assert first.describe() == f"sqlite {tmp_path / 's.sqlite3'}"
    first.close()
    second.close()


CHILD_WRITER = """
import sys, time
from shared.store import SqliteStore
store = SqliteStore(sys.argv[1])
store.put_run("child", {"state": "running"})
store.commit_iteration("child", 0, {"iteration": 0}, {"state": "running", "iteration": 0})
store.put_step("child", 1, bytes(range(256)))
print("acknowledged", flush=True)
time.sleep(60)
"""


def test_sqlite_write_survives_kill_9_of_the_writer(tmp_path):
    path = tmp_path / "runs" / "state.sqlite3"
    reader = SqliteStore(path)  # open while another process writes
    child = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(path)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert child.stdout.readline() == b"acknowledged\n"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -9
    assert reader.get_run("child") == {"state": "running", "iteration": 0}
    reader.close()
    reopened = SqliteStore(path)
    assert reopened.iterations("child") == [{"iteration": 0}]
    assert reopened.get_step("child", 1) == bytes(range(256))
    reopened.close()


def test_sqlite_commit_iteration_is_all_or_nothing(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.put_run("r", {"iteration": 0})
    # A trigger makes the document update fail after the record is written in the same transaction.
    with sqlite3.connect(tmp_path / "s.sqlite3") as other:
        other.execute("CREATE TRIGGER refuse BEFORE UPDATE ON runs BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        store.commit_iteration("r", 1, {"iteration": 1}, {"iteration": 1})
    assert store.iterations("r") == []
    assert store.get_run("r") == {"iteration": 0}
    store.close()


# Redis


def test_redis_call_waits_for_a_restart(redis_server, caplog):
    store = RedisStore(redis_server.url, outage_budget_s=30)
    blob = os.urandom(1024 * 1024)
    store.put_run("r", {"iteration": 0})
    store.commit_iteration("r", 0, {"iteration": 0}, {"iteration": 0})
    store.put_step("r", 1, blob)
    redis_server.kill()
    up_while_down = []

    def restart_later():
        time.sleep(1.5)
        up_while_down.append(store_up())
        redis_server.restart()

    restarter = threading.Thread(target=restart_later)
    started = time.monotonic()
    restarter.start()
    with caplog.at_level(logging.WARNING, logger="shared.store"), ThreadPoolExecutor(2) as pool:
        write = pool.submit(store.commit_iteration, "r", 1, {"iteration": 1}, {"iteration": 1})
        read = pool.submit(store.get_run, "r")
        write.result(timeout=20)
        assert read.result(timeout=20) in ({"iteration": 0}, {"iteration": 1})
    waited = time.monotonic() - started
    restarter.join()
    assert waited >= 1.4
    assert up_while_down == [0.0]
    assert store_up() == 1.0
    assert any(f"redis 127.0.0.1:{redis_server.port}/0" in record.getMessage() for record in caplog.records)
    # Everything acknowledged before the kill is there (appendfsync always), and the write made during the outage.
    assert store.get_run("r") == {"iteration": 1}
    assert store.iterations("r") == [{"iteration": 0}, {"iteration": 1}]
    assert store.get_step("r", 1) == blob
    store.put_run("s", {})
    assert len(store.list_runs()) == 2
    store.close()


def test_redis_gives_up_after_the_outage_budget():
    port = free_port()  # nothing listens there
    store = RedisStore(f"redis://127.0.0.1:{port}/0", outage_budget_s=1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"run store redis 127.0.0.1:{port}/0 did not answer"):
        store.get_run("r")
    assert 1.0 <= time.monotonic() - started < 4.0
    assert store_up() == 0.0


def test_redis_refused_password_is_not_retried(redis_server):
    port = redis_server.port
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.config_set("requirepass", "right")
    store = RedisStore(f"redis://:wrong@127.0.0.1:{port}/0", outage_budget_s=30)
    assert store.describe() == f"redis 127.0.0.1:{port}/0"
    started = time.monotonic()
    with pytest.raises(redis.exceptions.AuthenticationError):
        store.get_run("r")
    assert time.monotonic() - started < 2.0


def test_redis_keys_under_the_prefix(redis_server):
    store = RedisStore(redis_server.url, key_prefix="team-a")
    store.commit_iteration("r", 0, {"iteration": 0}, {})
    store.put_step("r", 0, b"x")
    client = redis.Redis.from_url(redis_server.url)
    assert sorted(key.decode() for key in client.scan_iter()) == [
        "team-a:run:r",
        "team-a:run:r:iterations",
        "team-a:run:r:steps",
        "team-a:runs",
        "team-a:runs:seq",
    ]
    assert RedisStore(redis_server.url, key_prefix="team-b").list_runs() == []
    client.close()
    store.close()


# Config


class Holder(StrictModel):
    store: StoreConfig = StoreConfig()


@pytest.mark.parametrize("url", ["ftp://host/x", "sqlite:///", "postgres://db/runs", "runs/state.sqlite3"])
def test_unknown_store_url_is_a_config_error(url):
    with pytest.raises(ConfigError, match=r"store\.url"):
        load_config(Holder, overrides={"store.url": url})


def test_open_store(tmp_path, redis_server):
    default = open_store(StoreConfig(), tmp_path / "runs")
    assert default.describe() == f"sqlite {tmp_path / 'runs' / 'state.sqlite3'}"
    assert (tmp_path / "runs" / "state.sqlite3").is_file()
    assert store_up() == 1.0
    default.close()
    named = open_store(StoreConfig(url=f"sqlite:///{tmp_path}/elsewhere/s.sqlite3"), tmp_path / "runs")
    assert named.describe() == f"sqlite {tmp_path / 'elsewhere' / 's.sqlite3'}"
    named.close()
    remote = open_store(StoreConfig(url=redis_server.url, key_prefix="x"), tmp_path / "runs")
    assert isinstance(remote, RedisStore)
    remote.put_run("r", {"ok": True})
    assert remote.list_runs() == [{"ok": True}]
    remote.close()


def test_the_store_url_from_a_file_keeps_a_password_out_of_the_config(tmp_path, redis_server):
    """store.url_file: the URL read from a mounted Secret when the store opens; errors name the file, never the
    URL (it may hold a password)."""
    secret = tmp_path / "url"
    secret.write_text(redis_server.url + "\n")
    remote = open_store(StoreConfig(url_file=str(secret), key_prefix="f"), tmp_path / "runs")
    assert isinstance(remote, RedisStore)
    remote.put_run("r", {"ok": True})
    assert remote.list_runs() == [{"ok": True}]
    remote.close()
    with pytest.raises(ConfigError, match="exclusive"):
        load_config(Holder, overrides={"store.url": redis_server.url, "store.url_file": str(secret)})
    secret.write_text("postgres://user:hunter2@db/runs")
    with pytest.raises(ValueError, match=r"store.url_file .*unsupported scheme 'postgres'") as refused:
        open_store(StoreConfig(url_file=str(secret)), tmp_path / "runs")
    assert "hunter2" not in str(refused.value)
    secret.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        open_store(StoreConfig(url_file=str(secret)), tmp_path / "runs")
    with pytest.raises(ValueError, match="cannot read"):
        open_store(StoreConfig(url_file=str(tmp_path / "missing")), tmp_path / "runs")
