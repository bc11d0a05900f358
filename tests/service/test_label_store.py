"""The label store on both backends, for real: the SQLite file beside the runs, and a real redis-server (started by
the test, AOF with fsync always). Assignment rules, concurrency, timeouts, and nothing lost across a restart (a
closed and reopened SQLite file; a Redis server killed with SIGKILL and started again)."""

from __future__ import annotations

import threading
import time

import pytest

from services.labeling.store import AlreadyLabelled, LabelStore, NotAssigned, UnknownTask, open_label_store
from shared.errors import InvalidInput
from shared.store import StoreConfig

ITEMS = [
    {"prompt": "the park was", "responses": ["happy and warm.", "sad."]},
    {"prompt": "my friend said", "responses": ["kind words.", "awful awful."]},
    {"prompt": "rank these", "responses": ["one", "two", "three"]},
]


@pytest.fixture(params=["sqlite", "redis"])
def store_config(request, tmp_path):
    if request.param == "sqlite":
        yield StoreConfig(), tmp_path
    else:
        server = request.getfixturevalue("redis_server")
        yield StoreConfig(url=server.url), tmp_path


def open_store(store_config, **kwargs) -> LabelStore:
    config, runs_dir = store_config
    return open_label_store(config, runs_dir, **kwargs)


def test_each_task_goes_to_n_annotators_never_twice_to_one(store_config):
    store = open_store(store_config, annotators_per_task=2)
    ids = store.add_tasks("b1", ITEMS)
    assert store.add_tasks("b1", ITEMS) == ids  # the same tasks again: nothing new
    assert len(store.tasks("b1")) == 3 and store.queue_size() == 3
    seen: dict[str, list[str]] = {}
    for annotator in ("alice", "bob", "carol"):
        while (found := store.next_task(annotator)) is not None:
            task, assignment = found
            assert sorted(assignment.order) == list(range(len(task.responses)))
            if task.kind == "pair":
                store.submit(annotator, task.id, "a")
            else:
                store.submit(annotator, task.id, ranking=[1, 2, 0])
            seen.setdefault(task.id, []).append(annotator)
    assert {tid: len(who) for tid, who in seen.items()} == {tid: 2 for tid in ids}
    assert all(len(set(who)) == len(who) for who in seen.values())
    assert seen == {tid: ["alice", "bob"] for tid in ids}  # oldest task first; carol finds nothing left
    assert store.queue_size() == 0 and store.progress("carol") == {"labelled": 0, "available": 0}
    store.close()


def test_labels_are_stored_in_terms_of_the_original_responses(store_config):
    store = open_store(store_config, annotators_per_task=1)
    store.add_tasks("b1", ITEMS)
    picked = {}
    while (found := store.next_task("alice")) is not None:
        task, assignment = found
        shown = [task.responses[i] for i in assignment.order]
        if task.kind == "pair":
            label = store.submit("alice", task.id, "b", comment="the second one")  # the response shown second
            picked[task.id] = shown[1]
            assert task.responses["ab".index(label.choice)] == shown[1]
            assert label.order == assignment.order and label.comment == "the second one"
        else:
            label = store.submit("alice", task.id, ranking=[2, 0, 1])
            assert [task.responses[i] for i in label.ranking] == [shown[2], shown[0], shown[1]]
    assert len(picked) == 2


def test_bad_submissions_get_clear_errors_and_change_nothing(store_config):
    store = open_store(store_config, annotators_per_task=1)
    store.add_tasks("b1", ITEMS[:1])
    task, _ = store.next_task("alice")
    with pytest.raises(UnknownTask, match="no such task"):
        store.submit("alice", "b1-nope", "a")
    with pytest.raises(NotAssigned, match="not assigned to bob"):
        store.submit("bob", task.id, "a")
    with pytest.raises(InvalidInput, match="choice: must be one of"):
        store.submit("alice", task.id, "c")
    assert store.labels() == []
    store.submit("alice", task.id, "tie")
    with pytest.raises(AlreadyLabelled, match="already labelled by alice"):
        store.submit("alice", task.id, "a")
    assert [label.choice for label in store.labels()] == ["tie"]
    with pytest.raises(InvalidInput, match="row 2: 'responses'"):
        store.add_tasks("b2", [ITEMS[0], {"prompt": "x", "responses": ["only one"]}])
    assert store.tasks("b2") == []  # nothing half-added
    store.add_tasks("b3", ITEMS[2:])
    ranking_task, _ = store.next_task("alice")
    with pytest.raises(InvalidInput, match="ranking: must order all 3"):
        store.submit("alice", ranking_task.id, ranking=[0, 0, 1])


def test_an_unanswered_assignment_goes_back_to_the_pool(store_config):
    store = open_store(store_config, annotators_per_task=1, assignment_timeout_s=0.3)
    store.add_tasks("b1", ITEMS[:1])
    task, _ = store.next_task("alice")
    assert store.next_task("bob") is None  # alice holds the only place
    assert store.next_task("alice")[0].id == task.id  # alice gets her open assignment back
    time.sleep(0.4)
    assert store.next_task("bob")[0].id == task.id  # timed out: bob may take it
    store.submit("bob", task.id, "a")
    assert store.next_task("alice") is None


def test_concurrent_annotators_never_exceed_n_per_task(store_config):
    config, runs_dir = store_config
    stores = [open_label_store(config, runs_dir, annotators_per_task=2) for _ in range(6)]
    stores[0].add_tasks("b1", [{"prompt": f"p{i}", "responses": [f"x{i}", f"y{i}"]} for i in range(10)])
    errors = []

    def work(index: int):
        try:
            store = stores[index]
            while (found := store.next_task(f"annotator{index}")) is not None:
                store.submit(f"annotator{index}", found[0].id, "a")
        except Exception as exc:  # reported below: the assertion names it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    per_task: dict[str, list[str]] = {}
    for label in stores[0].labels():
        per_task.setdefault(label.task_id, []).append(label.annotator)
    assert len(per_task) == 10
    assert all(len(who) == 2 and len(set(who)) == 2 for who in per_task.values()), per_task
    for store in stores:
        store.close()


def test_a_restart_loses_nothing(store_config, request):
    store = open_store(store_config, annotators_per_task=2)
    store.add_tasks("b1", ITEMS)
    task, _ = store.next_task("alice")
    store.submit("alice", task.id, "b")
    open_task, open_assignment = store.next_task("alice")
    before = (store.tasks(), store.labels())
    store.close()
    if store_config[0].url:
        server = request.getfixturevalue("redis_server")
        server.kill()  # SIGKILL: only what the AOF holds survives
        server.restart()
    reopened = open_store(store_config, annotators_per_task=2)
    assert (reopened.tasks(), reopened.labels()) == before
    again, assignment_again = reopened.next_task("alice")  # the open assignment, same display order
    assert (again.id, assignment_again.order) == (open_task.id, open_assignment.order)
    with pytest.raises(AlreadyLabelled):
        reopened.submit("alice", task.id, "a")
    reopened.close()


def test_labels_share_the_run_stores_sqlite_file(tmp_path):
    from shared.store import open_store as open_run_store

    runs = open_run_store(StoreConfig(), tmp_path)
    runs.put_run("run-1", {"state": "running"})
    labels = open_label_store(StoreConfig(), tmp_path)
    labels.add_tasks("b1", ITEMS[:1])
    assert runs.describe() == f"sqlite {(tmp_path / 'state.sqlite3').absolute()}"
    assert labels.path == (tmp_path / "state.sqlite3").absolute()
    assert runs.get_run("run-1") == {"state": "running"} and len(labels.tasks()) == 1
