"""The label store on both backends, for real: the SQLite file beside the runs, and a real redis-server (started by
the test, AOF with fsync always). Assignment rules, concurrency, timeouts and late labels, nothing lost across a
restart (a closed and reopened SQLite file; a Redis server killed with SIGKILL and started again), a Redis outage
waited through, a commit whose reply was lost; and the human labeller waiting on the store for people's labels."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

from services.labeling.export import Aggregate
from services.labeling.human import HumanLabeler, HumanLabelerConfig, batch_preference_rows
from services.labeling.labelers import Choice, Comparison
from services.labeling.store import (
    AlreadyLabelled,
    AssignmentExpired,
    LabelStore,
    NotAssigned,
    UnknownTask,
    open_label_store,
)
from shared.errors import InvalidInput
from shared.store import StoreConfig

TIMEOUT_S = 0.6  # assignment timeout of the timing tests: far above a call's time, even on a loaded machine
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
    store = open_store(store_config, annotators_per_task=1, assignment_timeout_s=TIMEOUT_S)
    store.add_tasks("b1", ITEMS[:1])
    task, _ = store.next_task("alice")
    assert store.next_task("bob") is None  # alice holds the only place
    assert store.next_task("alice")[0].id == task.id  # alice gets her open assignment back
    time.sleep(TIMEOUT_S + 0.1)
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


def submit_original(store: LabelStore, annotator: str, wanted: str):
    """Takes the annotator's next task and labels it ``wanted`` in terms of the original responses ("a": the first
    is better), clicking whichever shown position holds that response."""
    task, assignment = store.next_task(annotator)
    shown = wanted if wanted in ("tie", "both_bad") else "ab"[assignment.order.index("ab".index(wanted))]
    return store.submit(annotator, task.id, shown)


def test_a_late_label_is_refused_once_the_task_went_to_others(store_config):
    store = open_store(store_config, annotators_per_task=1, assignment_timeout_s=TIMEOUT_S)
    store.add_tasks("b1", ITEMS[:1])
    task, _ = store.next_task("alice")
    time.sleep(TIMEOUT_S + 0.1)
    store.next_task("bob")  # alice's place timed out: bob takes it and labels it
    store.submit("bob", task.id, "a")
    with pytest.raises(AssignmentExpired, match=r"expired .* gone to other annotators"):
        store.submit("alice", task.id, "b")  # the page alice left open
    assert [label.annotator for label in store.labels()] == ["bob"]  # never more than annotators_per_task


def test_a_late_label_is_kept_while_the_task_has_room_and_a_retaken_task_keeps_its_order(store_config):
    store = open_store(store_config, annotators_per_task=1, assignment_timeout_s=TIMEOUT_S)
    store.add_tasks("b1", ITEMS[2:])  # a ranking: 6 possible orders
    task, first = store.next_task("alice")
    time.sleep(TIMEOUT_S + 0.1)
    again, second = store.next_task("alice")  # timed out, nobody else took it: alice again, shown as before
    assert again.id == task.id and second.order == first.order and second.assigned_at > first.assigned_at
    time.sleep(TIMEOUT_S + 0.1)
    label = store.submit("alice", task.id, ranking=[0, 1, 2])  # late, but the task still has room
    assert label.ranking == first.order and label.order == first.order


def test_progress_counts_the_places_others_hold(store_config):
    store = open_store(store_config, annotators_per_task=1, assignment_timeout_s=TIMEOUT_S)
    store.add_tasks("b1", ITEMS[:2])
    store.next_task("alice")
    assert store.progress("alice") == {"labelled": 0, "available": 2}  # her open task, and the other one
    assert store.progress("bob") == {"labelled": 0, "available": 1}  # alice holds one place
    time.sleep(TIMEOUT_S + 0.1)
    assert store.progress("bob") == {"labelled": 0, "available": 2}


def test_a_call_waits_for_a_restarting_redis(redis_server):
    store = open_label_store(StoreConfig(url=redis_server.url, outage_budget_s=30), "unused", annotators_per_task=1)
    store.add_tasks("b1", ITEMS[:2])
    submit_original(store, "alice", "a")
    redis_server.kill()
    restarter = threading.Timer(1.0, redis_server.start)
    restarter.start()
    try:
        label = submit_original(store, "alice", "b")  # waits through the outage, then goes on
    finally:
        restarter.join()
    assert [x.choice for x in store.labels()] == ["a", "b"] and label.choice == "b"
    store.close()


def test_a_commit_whose_reply_was_lost_is_applied_once(redis_server):
    store = open_label_store(StoreConfig(url=redis_server.url), "unused", annotators_per_task=1)
    store.add_tasks("b1", ITEMS[:1])
    task, _ = store.next_task("alice")
    commit, lost = store._commit, []

    def commit_then_lose_the_reply(**kwargs):
        result = commit(**kwargs)
        if not lost:
            lost.append(result)
            raise redis.exceptions.ConnectionError("connection reset (test)")
        return result

    store._commit = commit_then_lose_the_reply
    label = store.submit("alice", task.id, "tie")  # not AlreadyLabelled: the commit's mark says it happened
    assert lost == [1] and [x.choice for x in store.labels()] == [label.choice] == ["tie"]
    store.close()


COMPARISONS = [
    Comparison("the park was", "happy and warm.", "sad."),
    Comparison("my friend said", "kind words.", "awful awful."),
    Comparison("the food was", "tasty.", "cold and bland."),
]


async def test_the_human_labeler_waits_for_every_task_and_answers_with_the_majority(store_config):
    store = open_store(store_config, annotators_per_task=2)
    config = HumanLabelerConfig(annotators_per_task=2, poll_s=0.05, timeout_s=30)
    labeling = asyncio.create_task(HumanLabeler(config, store, "round-1").label(COMPARISONS))
    await asyncio.sleep(0.2)  # the tasks are in the store now
    for wanted in ("a", "b", "both_bad"):
        await asyncio.to_thread(submit_original, store, "alice", wanted)
    for wanted in ("a", "a"):
        await asyncio.to_thread(submit_original, store, "bob", wanted)
    await asyncio.sleep(0.3)
    assert not labeling.done()  # the third comparison has one label of two
    await asyncio.to_thread(submit_original, store, "bob", "both_bad")
    verdicts = await asyncio.wait_for(labeling, 10)
    assert [v.choice for v in verdicts] == [Choice.A, Choice.TIE, Choice.BOTH_BAD]  # the second: a split vote
    assert verdicts[0].labeler == "human:alice,bob" and verdicts[1].labeler == "human"
    c0, c1 = COMPARISONS[:2]
    assert batch_preference_rows(store, "round-1") == [
        {"prompt": c0.prompt, "chosen": c0.response_a, "rejected": c0.response_b},  # alice
        {"prompt": c1.prompt, "chosen": c1.response_b, "rejected": c1.response_a},  # alice
        {"prompt": c0.prompt, "chosen": c0.response_a, "rejected": c0.response_b},  # bob
        {"prompt": c1.prompt, "chosen": c1.response_a, "rejected": c1.response_b},  # bob
    ]
    assert batch_preference_rows(store, "round-1", Aggregate.MAJORITY) == [
        {"prompt": c0.prompt, "chosen": c0.response_a, "rejected": c0.response_b}
    ]
    store.close()


async def test_the_human_labeler_counts_labels_per_task_not_in_all(tmp_path):
    # The app gives each task to 2 people, the labeller asks for 1 each: 2 labels of the first task are not enough.
    store = open_label_store(StoreConfig(), tmp_path, annotators_per_task=2)
    config = HumanLabelerConfig(annotators_per_task=1, poll_s=0.05, timeout_s=30)
    labeling = asyncio.create_task(HumanLabeler(config, store, "round-1").label(COMPARISONS[:2]))
    await asyncio.sleep(0.2)
    await asyncio.to_thread(submit_original, store, "alice", "a")
    await asyncio.to_thread(submit_original, store, "bob", "a")  # the same (oldest) task
    await asyncio.sleep(0.3)
    assert not labeling.done()
    await asyncio.to_thread(submit_original, store, "alice", "b")
    assert [v.choice for v in await asyncio.wait_for(labeling, 10)] == [Choice.A, Choice.B]
    store.close()


async def test_the_human_labeler_gives_up_after_its_timeout(tmp_path):
    store = open_label_store(StoreConfig(), tmp_path)
    config = HumanLabelerConfig(annotators_per_task=1, poll_s=0.05, timeout_s=0.3)
    with pytest.raises(TimeoutError, match=r"batch round-1: 0 of 3 labels after 0\.3 s"):
        await HumanLabeler(config, store, "round-1").label(COMPARISONS)
    assert len(store.tasks("round-1")) == 3  # the tasks stay: a retry with the same batch finds them
    store.close()
