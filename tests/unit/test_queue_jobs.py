"""Delivery queue on a real SQLite file: jobs with the rows, leases, retries, timers."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydantic
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import create_engine, func, select

from dicomgate.config import DuplicatePolicy
from dicomgate.errors import IndexError_
from dicomgate.index.db import Index, Outcome, StoredInstance, normalize_url
from dicomgate.index.extract import extract_record
from dicomgate.index.schema import delivery_attempt
from dicomgate.queue import (
    Job,
    JobQueue,
    JobState,
    NewJob,
    NewTimer,
    QueueConfig,
    RetryPolicy,
    backoff,
)
from dicomgate.queue import jobs as jobs_module

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_item(
    sop_uid: str = "1.2.3.4.5.1",
    *,
    relpath: str | None = None,
    series_uid: str = "1.2.3.4",
    study_uid: str = "1.2.3",
    size: int = 1000,
) -> StoredInstance:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    return StoredInstance(
        record=extract_record(ds),
        relpath=relpath or f"{study_uid}/{series_uid}/{sop_uid}.dcm",
        size=size,
        sha256="ab" * 32,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MODALITY",
        called_ae="DICOMGATE",
        source_ip="10.0.0.7",
        received_via="dimse",
        received_at=T0,
    )


class Clock:
    """The queue's clock, a little ahead of the real one (Index.record stamps real time)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC) + timedelta(seconds=1)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests on the embedded SQLite and on PostgreSQL at 127.0.0.1:5432."""
    if request.param == "postgresql":
        return _fresh_postgres(request)
    return f"sqlite:///{tmp_path}/index.db"


def _fresh_postgres(request: pytest.FixtureRequest) -> str:
    """The module's PostgreSQL database, emptied (the ``database_url`` fixture)."""
    url = str(request.getfixturevalue("database_url"))
    engine = create_engine(normalize_url(url))
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA public CASCADE")
        connection.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()
    return url


@pytest.fixture
def index(url: str) -> Iterator[Index]:
    idx = Index.open(url)
    yield idx
    idx.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_queue(index: Index, clock: Clock, **retry: float) -> JobQueue:
    config = QueueConfig(lease_seconds=300, retry=RetryPolicy.model_validate(retry))
    return JobQueue(index.engine, config, clock=clock, rng=random.Random(7))


@pytest.fixture
def queue(index: Index, clock: Clock) -> JobQueue:
    return make_queue(index, clock)


def store(index: Index, sop_uid: str, *jobs: NewJob) -> None:
    (result,) = index.record([make_item(sop_uid)], DuplicatePolicy.REJECT, [jobs])
    assert result.outcome is Outcome.STORED


def lease_one(queue: JobQueue, destination: str = "pacs") -> Job:
    (job,) = queue.lease(destination, 10, "worker-1")
    return job


# -- configuration ------------------------------------------------------------------------


def test_config_defaults_ride_out_an_outage_and_drain_within_a_minute() -> None:
    config = QueueConfig()
    assert config.retry.max == 60.0
    assert config.retry.max_age >= 6 * 3600
    assert config.retry.max_attempts == 0


def test_config_refuses_unknown_keys_and_impossible_values() -> None:
    with pytest.raises(pydantic.ValidationError, match="extra"):
        QueueConfig.model_validate({"lease_second": 10})
    with pytest.raises(pydantic.ValidationError, match="initial"):
        RetryPolicy(initial=120, max=60)
    with pytest.raises(pydantic.ValidationError):
        RetryPolicy(jitter=1.5)


# -- jobs are created with the rows ---------------------------------------------------------


def test_jobs_are_written_with_their_instance(index: Index, queue: JobQueue) -> None:
    items = [make_item("1.1"), make_item("1.2")]
    jobs = [
        [NewJob("pacs", "ct-to-pacs"), NewJob("cloud", "ct-to-pacs")],
        [NewJob("pacs", "ct-to-pacs")],
    ]
    index.record(items, DuplicatePolicy.REJECT, jobs)
    assert queue.counts() == {("pacs", "pending"): 2, ("cloud", "pending"): 1}
    listed = queue.list(destination="pacs")
    assert [row["sop_instance_uid"] for row in listed] == ["1.1", "1.2"]
    assert listed[0]["study_instance_uid"] == "1.2.3"
    assert listed[0]["state"] == "pending" and listed[0]["attempts"] == 0


def test_a_failing_batch_leaves_no_jobs(index: Index, queue: JobQueue) -> None:
    items = [make_item("2.1"), make_item("2.2", size=-1)]  # the second violates a CHECK
    with pytest.raises(IndexError_):
        index.record(items, DuplicatePolicy.REJECT, [[NewJob("pacs", "r")]] * 2)
    assert index.count_instances() == 0
    assert queue.counts() == {}


def test_a_rejected_duplicate_gets_no_job_and_no_timer(
    index: Index, queue: JobQueue, clock: Clock
) -> None:
    store(index, "3.1", NewJob("pacs", "r"))
    timer = NewTimer("stable", "series", "1.2.3.4", 0.0, ("pacs",))
    (result,) = index.record(
        [make_item("3.1", relpath="again.dcm")],
        DuplicatePolicy.REJECT,
        [[NewJob("cloud", "r")]],
        [[timer]],
    )
    assert result.outcome is Outcome.REJECTED
    assert queue.counts() == {("pacs", "pending"): 1}
    assert queue.fire_due_timers() == 0


def test_jobs_and_items_must_pair_up(index: Index) -> None:
    with pytest.raises(ValueError, match="one entry per item"):
        index.record([make_item()], DuplicatePolicy.REJECT, [[], []])


# -- leasing ----------------------------------------------------------------------------------


def test_lease_hands_out_highest_priority_first_then_oldest(index: Index, queue: JobQueue) -> None:
    store(index, "4.1", NewJob("pacs", "bulk"))
    store(index, "4.2", NewJob("pacs", "urgent", priority=10))
    store(index, "4.3", NewJob("pacs", "bulk"))
    store(index, "4.4", NewJob("pacs", "mid", priority=5))
    store(index, "4.5", NewJob("cloud", "bulk", priority=99))
    first = queue.lease("pacs", 2, "w")
    assert [job.sop_instance_uid for job in first] == ["4.2", "4.4"]
    rest = queue.lease("pacs", 10, "w")
    assert [job.sop_instance_uid for job in rest] == ["4.1", "4.3"]
    assert queue.lease("pacs", 10, "w") == []
    job = first[0]
    assert (job.destination, job.route, job.priority, job.attempts) == ("pacs", "urgent", 10, 1)
    assert job.relpath == "1.2.3/1.2.3.4/4.2.dcm"
    assert (job.study_instance_uid, job.series_instance_uid) == ("1.2.3", "1.2.3.4")
    assert job.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert job.size == 1000 and job.created_at.tzinfo is not None
    row = queue.get(job.id)
    assert row is not None and row["state"] == "leased" and row["leased_by"] == "w"


def test_an_expired_lease_comes_back(index: Index, queue: JobQueue, clock: Clock) -> None:
    store(index, "5.1", NewJob("pacs", "r"))
    crashed = lease_one(queue)
    clock.advance(299)
    assert queue.lease("pacs", 10, "worker-2") == []
    assert queue.destinations_with_due_jobs() == []
    clock.advance(2)
    assert queue.destinations_with_due_jobs() == ["pacs"]
    again = lease_one(queue)
    assert again.id == crashed.id
    assert again.attempts == 2  # the crashed attempt counts


def test_a_restarted_node_ends_its_previous_processes_leases(
    index: Index, queue: JobQueue, clock: Clock
) -> None:
    for n, worker in enumerate(["gw_1:100", "gw_1:200", "gw_1:300", "gw%1:100", "gwx1:100"]):
        store(index, f"5.5.{n}", NewJob("pacs", "r"))
        assert len(queue.lease("pacs", 1, worker)) == 1
    # This process is gw_1:300; gw%1 and gwx1 are other nodes ("_" and "%" match literally).
    assert queue.expire_leases_of("gw_1", "gw_1:300") == 2
    assert queue.expire_leases_of("gw_1", "gw_1:300") == 0  # already ended
    clock.advance(0.001)
    again = queue.lease("pacs", 10, "gw_1:300")
    assert sorted(j.sop_instance_uid for j in again) == ["5.5.0", "5.5.1"]
    assert {j.attempts for j in again} == {2}  # the lost attempt counts, as on expiry


def test_concurrent_leasers_never_share_a_job(index: Index, queue: JobQueue) -> None:
    items = [make_item(f"6.{n}") for n in range(60)]
    index.record(items, DuplicatePolicy.REJECT, [[NewJob("pacs", "r")]] * len(items))
    taken: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while jobs := queue.lease("pacs", 3, name):
            with lock:
                taken.extend(job.id for job in jobs)

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 60 and len(set(taken)) == 60


def test_complete_marks_done_and_counts(index: Index, queue: JobQueue) -> None:
    store(index, "7.1", NewJob("pacs", "r"), NewJob("cloud", "r"))
    job = lease_one(queue)
    queue.complete([job])
    queue.complete([])
    assert queue.counts() == {("pacs", "done"): 1, ("cloud", "pending"): 1}
    assert queue.destinations_with_due_jobs() == ["cloud"]
    assert queue.lease("pacs", 10, "w") == []


# -- retry, backoff, dead-letter --------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial=1, max=60, multiplier=2, jitter=0)
    assert [backoff(n, policy) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff(0, policy) == 1
    assert backoff(100_000, policy) == 60  # no overflow


def test_backoff_jitter_stays_within_bounds_and_below_the_cap() -> None:
    policy = RetryPolicy(initial=1, max=60, multiplier=2, jitter=0.2)
    rng = random.Random(1)
    small = [backoff(3, policy, rng) for _ in range(500)]
    assert all(3.2 <= delay <= 4.8 for delay in small)
    assert max(small) - min(small) > 1.0  # actually spread
    capped = [backoff(20, policy, rng) for _ in range(500)]
    assert all(48.0 <= delay <= 60.0 for delay in capped)
    assert min(capped) < 50.0


def test_fail_reschedules_with_backoff_and_keeps_the_error(
    index: Index, queue: JobQueue, clock: Clock
) -> None:
    store(index, "8.1", NewJob("pacs", "r"))
    job = lease_one(queue)
    assert queue.fail(job, "association rejected") is JobState.PENDING
    row = queue.get(job.id)
    assert row is not None
    assert row["state"] == "pending" and row["last_error"] == "association rejected"
    wait = (row["not_before"] - clock.now).total_seconds()
    assert 0.8 <= wait <= 1.2  # initial 1 s +- 20 %
    assert queue.lease("pacs", 10, "w") == []
    clock.advance(wait)
    second = lease_one(queue)
    assert second.attempts == 2
    queue.fail(second, "again")
    row = queue.get(job.id)
    assert row is not None
    assert 1.6 <= (row["not_before"] - clock.now).total_seconds() <= 2.4


def test_fail_waits_the_peers_retry_after_up_to_the_policy_max(index: Index, clock: Clock) -> None:
    queue = make_queue(index, clock, initial=1.0, max=60.0, jitter=0.0)
    store(index, "8.2", NewJob("pacs", "r"), NewJob("cloud", "r"), NewJob("ai", "r"))
    waits = {}
    for destination, retry_after in (("pacs", 30.0), ("cloud", 0.5), ("ai", 3600.0)):
        job = lease_one(queue, destination)
        queue.fail(job, "HTTP 429", wait=retry_after)
        row = queue.get(job.id)
        assert row is not None
        waits[destination] = (row["not_before"] - clock.now).total_seconds()
    # Longer than the backoff: the peer's; shorter: the backoff; past max: max.
    assert waits == {"pacs": 30.0, "cloud": 1.0, "ai": 60.0}


def test_an_error_with_a_nul_is_recorded(index: Index, queue: JobQueue) -> None:
    """A peer's error comment may hold a NUL (PostgreSQL refuses one in text): the failure
    is still recorded, the NUL made a space, on both databases."""
    store(index, "8.2", NewJob("pacs", "r"))
    job = lease_one(queue)
    assert queue.fail(job, "0xA700: disk\x00full") is JobState.PENDING
    row = queue.get(job.id)
    assert row is not None and row["last_error"] == "0xA700: disk full"


def test_names_as_long_as_the_config_allows(index: Index, queue: JobQueue) -> None:
    """Route and destination names of 64 characters (the config's limit) fit the queue on
    both databases."""
    store(index, "8.3", NewJob("d" * 64, "r" * 64))
    (job,) = queue.lease("d" * 64, 10, "worker-1")
    assert job.route == "r" * 64
    queue.complete([job])


def test_max_attempts_dead_letters(index: Index, clock: Clock) -> None:
    queue = make_queue(index, clock, max_attempts=2)
    store(index, "9.1", NewJob("pacs", "r"))
    assert queue.fail(lease_one(queue), "first") is JobState.PENDING
    clock.advance(10)
    assert queue.fail(lease_one(queue), "second") is JobState.DEAD
    clock.advance(3600)
    assert queue.lease("pacs", 10, "w") == []
    (row,) = queue.list(state="dead")
    assert row["last_error"] == "second" and row["attempts"] == 2
    assert queue.destinations_with_due_jobs() == []


def test_max_age_and_permanent_errors_dead_letter(index: Index, clock: Clock) -> None:
    queue = make_queue(index, clock, max_age=600)
    store(index, "10.1", NewJob("pacs", "r"), NewJob("cloud", "r"))
    assert queue.fail(lease_one(queue, "cloud"), "0xA900", retryable=False) is JobState.DEAD
    assert queue.fail(lease_one(queue), "refused") is JobState.PENDING
    clock.advance(601)
    assert queue.fail(lease_one(queue), "still refused") is JobState.DEAD
    assert queue.counts() == {("pacs", "dead"): 1, ("cloud", "dead"): 1}


def test_default_policy_survives_a_six_hour_outage(index: Index, queue: JobQueue) -> None:
    clock = Clock()
    queue = make_queue(index, clock)
    store(index, "11.1", NewJob("pacs", "r"))
    outage_end = clock.now + timedelta(hours=6)
    longest = 0.0
    while clock.now < outage_end:
        job = lease_one(queue)
        assert queue.fail(job, "connection refused") is JobState.PENDING
        row = queue.get(job.id)
        assert row is not None
        wait = (row["not_before"] - clock.now).total_seconds()
        longest = max(longest, wait)
        clock.now = row["not_before"]
    assert longest <= 60.0  # once the PACS is back, the job is retried within a minute
    assert lease_one(queue).attempts > 300


def test_fail_of_a_job_no_longer_leased_changes_nothing(index: Index, queue: JobQueue) -> None:
    store(index, "12.1", NewJob("pacs", "r"))
    job = lease_one(queue)
    queue.complete([job])
    assert queue.fail(job, "late failure") is JobState.DONE
    row = queue.get(job.id)
    assert row is not None and row["state"] == "done" and row["last_error"] is None


def test_postpone_does_not_count_an_attempt(index: Index, queue: JobQueue, clock: Clock) -> None:
    store(index, "13.1", NewJob("pacs", "r"))
    job = lease_one(queue)
    queue.postpone([job.id], 30)
    row = queue.get(job.id)
    assert row is not None and row["state"] == "pending" and row["attempts"] == 0
    clock.advance(29)
    assert queue.lease("pacs", 10, "w") == []
    clock.advance(1)
    assert lease_one(queue).attempts == 1


# -- operator control -------------------------------------------------------------------------


def test_retry_retry_dead_and_purge(index: Index, queue: JobQueue, clock: Clock) -> None:
    for n in range(3):
        store(index, f"14.{n}", NewJob("pacs", "r"), NewJob("cloud", "r"))
    for job in queue.lease("pacs", 10, "w") + queue.lease("cloud", 10, "w"):
        queue.fail(job, "bad", retryable=False)
    assert queue.counts() == {("pacs", "dead"): 3, ("cloud", "dead"): 3}

    first = queue.list(state="dead", destination="pacs", limit=1)[0]["id"]
    assert queue.retry(first) is True
    row = queue.get(first)
    assert row is not None and row["state"] == "pending" and row["attempts"] == 0
    assert queue.retry(10_000) is False
    redriven = lease_one(queue)
    assert redriven.id == first
    queue.complete([redriven])
    assert queue.retry(first) is False  # done is done

    assert queue.retry_dead("pacs") == 2
    assert queue.retry_dead() == 3
    assert queue.retry_dead() == 0
    for job in queue.lease("pacs", 10, "w"):
        queue.complete([job])
    assert queue.purge(state="done", destination="cloud") == 0
    assert queue.purge(state="done") == 3
    assert queue.counts() == {("cloud", "pending"): 3}
    with pytest.raises(ValueError, match="done or dead"):
        queue.purge(state="pending")
    with pytest.raises(ValueError):
        queue.list(state="bogus")
    assert queue.get(10_000) is None
    assert len(queue.list(limit=2, offset=2)) == 1


def test_retry_dead_and_purge_work_in_batches(
    index: Index, queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large dead-letter set goes in several transactions, each job once."""
    monkeypatch.setattr(jobs_module, "_OPERATOR_BATCH", 3)
    monkeypatch.setattr(jobs_module, "_ID_CHUNK", 2)
    for n in range(7):
        store(index, f"14.5.{n}", NewJob("pacs", "r"), NewJob("cloud", "r"))
    for job in queue.lease("pacs", 10, "w") + queue.lease("cloud", 10, "w"):
        queue.fail(job, "bad", retryable=False)
    assert queue.retry_dead("pacs") == 7
    assert queue.counts() == {("pacs", "pending"): 7, ("cloud", "dead"): 7}
    for job in queue.lease("pacs", 10, "w"):
        outcomes = [h["outcome"] for h in queue.history(job.id)]
        assert outcomes == ["dead", "redriven"], outcomes
        queue.complete([job])
    assert queue.purge(state="dead", destination="cloud") == 7
    assert queue.purge(state="done") == 7
    assert queue.counts() == {}
    assert _history_rows(index) == 0


def test_a_redriven_job_gets_a_fresh_age_budget(index: Index, clock: Clock) -> None:
    queue = make_queue(index, clock, max_age=600)
    store(index, "15.1", NewJob("pacs", "r"))
    clock.advance(700)
    job = lease_one(queue)
    assert queue.fail(job, "down") is JobState.DEAD
    assert queue.retry(job.id)
    assert queue.fail(lease_one(queue), "down") is JobState.PENDING


def _history_rows(index: Index) -> int:
    with index.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(delivery_attempt)).scalar())


def test_history_records_each_attempt_and_redrive(index: Index, clock: Clock) -> None:
    queue = make_queue(index, clock, max_attempts=2)
    store(index, "15.5", NewJob("pacs", "r"))
    first = queue.lease("pacs", 1, "node-a:1")[0]
    leased_at = clock.now
    clock.advance(3)
    assert queue.fail(first, "connection refused") is JobState.PENDING
    clock.advance(10)
    assert queue.fail(queue.lease("pacs", 1, "node-b:2")[0], "0xA700") is JobState.DEAD
    assert queue.retry(first.id)
    clock.advance(1)
    delivered = queue.lease("pacs", 1, "node-a:1")[0]
    clock.advance(2)
    queue.complete([delivered])
    history = queue.history(first.id)
    assert [(h["attempt"], h["outcome"], h["node"], h["error"]) for h in history] == [
        (1, "failed", "node-a:1", "connection refused"),
        (2, "dead", "node-b:2", "0xA700"),
        (2, "redriven", "", None),  # the counter was 2 when the operator reset it
        (1, "delivered", "node-a:1", None),
    ]
    assert history[0]["started_at"] == leased_at
    assert (history[0]["finished_at"] - leased_at).total_seconds() == 3
    assert (history[3]["finished_at"] - history[3]["started_at"]).total_seconds() == 2
    assert queue.history(10_000) == []
    # Not an attempt: a postponed lease (circuit open, rate limit) leaves no row.
    store(index, "15.6", NewJob("pacs", "r"))
    waiting = lease_one(queue)
    queue.postpone([waiting.id], 5)
    assert queue.history(waiting.id) == []


def test_history_goes_with_its_jobs(index: Index, queue: JobQueue) -> None:
    store(index, "15.7", NewJob("pacs", "r"), NewJob("cloud", "r"))
    queue.complete([lease_one(queue)])
    queue.fail(lease_one(queue, "cloud"), "refused", retryable=False)
    assert queue.retry_dead("cloud") == 1
    queue.fail(lease_one(queue, "cloud"), "refused", retryable=False)
    assert _history_rows(index) == 4
    assert queue.purge(state="dead") == 1
    assert _history_rows(index) == 1
    # A replaced version's done job, and its history, go with the old row (overwrite).
    index.record(
        [make_item("15.7", relpath="new.dcm")], DuplicatePolicy.OVERWRITE, [[NewJob("pacs", "r")]]
    )
    assert _history_rows(index) == 0
    queue.complete([lease_one(queue)])
    assert queue.purge(state="done") == 1
    assert _history_rows(index) == 0


# -- duplicates -------------------------------------------------------------------------------


def test_overwrite_repoints_pending_jobs_to_the_new_version(index: Index, queue: JobQueue) -> None:
    store(index, "16.1", NewJob("pacs", "r"))
    (waiting,) = queue.list()
    (result,) = index.record(
        [make_item("16.1", relpath="new.dcm")],
        DuplicatePolicy.OVERWRITE,
        [[NewJob("pacs", "r"), NewJob("cloud", "r")]],
    )
    assert result.outcome is Outcome.REPLACED
    assert queue.counts() == {("pacs", "pending"): 1, ("cloud", "pending"): 1}
    job = lease_one(queue)
    assert (job.id, job.relpath) == (waiting["id"], "new.dcm")  # the same job, moved


def test_overwrite_keeps_leased_and_dead_jobs_and_drops_done_ones(
    index: Index, queue: JobQueue
) -> None:
    store(index, "17.1", NewJob("pacs", "r"), NewJob("cloud", "r"), NewJob("share", "r"))
    in_flight = lease_one(queue, "pacs")
    queue.fail(lease_one(queue, "cloud"), "refused", retryable=False)
    queue.complete([lease_one(queue, "share")])
    index.record(
        [make_item("17.1", relpath="new.dcm")],
        DuplicatePolicy.OVERWRITE,
        [[NewJob("pacs", "r"), NewJob("cloud", "r"), NewJob("share", "r")]],
    )
    # The in-flight delivery may send the old file: the new version gets its own job.
    assert queue.counts() == {
        ("pacs", "leased"): 1,
        ("pacs", "pending"): 1,
        ("cloud", "dead"): 1,
        ("cloud", "pending"): 1,
        ("share", "pending"): 1,
    }
    current = index.instance("17.1")
    assert current is not None
    assert {row["instance_pk"] for row in queue.list()} == {current["instance_pk"]}
    queue.complete([in_flight])
    assert lease_one(queue, "pacs").relpath == "new.dcm"


def test_overwrite_within_one_batch_keeps_one_pending_job(index: Index, queue: JobQueue) -> None:
    items = [make_item("18.1"), make_item("18.1", relpath="second.dcm")]
    index.record(items, DuplicatePolicy.OVERWRITE, [[NewJob("pacs", "r")]] * 2)
    assert queue.counts() == {("pacs", "pending"): 1}
    assert lease_one(queue).relpath == "second.dcm"


def test_keep_both_delivers_both_versions(index: Index, queue: JobQueue) -> None:
    store(index, "19.1", NewJob("pacs", "r"))
    index.record(
        [make_item("19.1", relpath="b.dcm")], DuplicatePolicy.KEEP_BOTH, [[NewJob("pacs", "r")]]
    )
    paths = sorted(job.relpath for job in queue.lease("pacs", 10, "w"))
    assert paths == ["1.2.3/1.2.3.4/19.1.dcm", "b.dcm"]


def test_deleting_an_instance_row_deletes_its_jobs(index: Index, queue: JobQueue) -> None:
    store(index, "20.1", NewJob("pacs", "r"))
    with index.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM instance")
    assert queue.counts() == {}


# -- stable timers ----------------------------------------------------------------------------


def _deadline(index: Index) -> datetime:
    with index.engine.connect() as connection:
        value = connection.exec_driver_sql("SELECT deadline FROM stable_timer").scalar_one()
    if isinstance(value, datetime):  # PostgreSQL: timestamptz
        return value.astimezone(UTC)
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def arm(
    index: Index,
    sop_uid: str,
    timer: NewTimer,
    *,
    series_uid: str = "1.2.3.4",
    study_uid: str = "1.2.3",
) -> None:
    item = make_item(sop_uid, series_uid=series_uid, study_uid=study_uid)
    index.record([item], DuplicatePolicy.REJECT, None, [[timer]])


def test_series_timer_is_pushed_by_each_instance_and_fires_once(
    index: Index, queue: JobQueue, clock: Clock
) -> None:
    timer = NewTimer("stable", "series", "1.2.3.4", 60.0, ("pacs", "cloud"), priority=3)
    arm(index, "21.1", timer)
    first_deadline = _deadline(index)
    time.sleep(0.002)
    arm(index, "21.2", timer)
    arm(index, "21.9", timer, series_uid="9.9.9")  # another series: not part of it
    pushed = _deadline(index)
    assert pushed > first_deadline
    clock.now = first_deadline
    assert queue.fire_due_timers() == 0
    clock.now = pushed
    assert queue.fire_due_timers() == 4  # two instances x two destinations
    assert queue.fire_due_timers() == 0
    jobs = queue.lease("pacs", 10, "w")
    assert sorted(job.sop_instance_uid for job in jobs) == ["21.1", "21.2"]
    assert {(job.route, job.priority) for job in jobs} == {("stable", 3)}

    # A late instance re-arms the timer; the next firing sends only what is new.
    arm(index, "21.3", timer)
    clock.now = _deadline(index)
    assert queue.fire_due_timers() == 2
    assert [job.sop_instance_uid for job in queue.lease("cloud", 10, "w")] == [
        "21.1",
        "21.2",
        "21.3",
    ]


def test_stable_routes_with_the_same_pipeline_deliver_once(index: Index, clock: Clock) -> None:
    """Two stable routes (and an instance route) with the same pipeline to one destination:
    one job per instance there; a route with another pipeline still gets its own."""
    config = QueueConfig(lease_seconds=300)
    groups = {"a": ("a", "b", "now"), "b": ("a", "b", "now"), "now": ("a", "b", "now")}
    groups["other-pipeline"] = ("other-pipeline",)
    queue = JobQueue(index.engine, config, clock=clock, same_pipeline=groups)
    ta = NewTimer("a", "study", "1.2.3", 5.0, ("pacs",))
    tb = NewTimer("b", "study", "1.2.3", 5.0, ("pacs", "cloud"))
    tc = NewTimer("other-pipeline", "study", "1.2.3", 5.0, ("pacs",))
    now_job = NewJob("pacs", "now")
    index.record([make_item("24.1")], DuplicatePolicy.REJECT, [[now_job]], [[ta, tb, tc]])
    index.record([make_item("24.2")], DuplicatePolicy.REJECT, None, [[ta, tb, tc]])
    clock.advance(10)
    # pacs: 24.2 once for a/b ("now" already has 24.1), 24.1 + 24.2 for the other pipeline;
    # cloud: both from b.
    assert queue.fire_due_timers() == 5
    jobs = queue.lease("pacs", 10, "w")
    assert sorted((job.sop_instance_uid, job.route) for job in jobs) == [
        ("24.1", "now"),
        ("24.1", "other-pipeline"),
        ("24.2", "a"),
        ("24.2", "other-pipeline"),
    ]
    assert sorted(job.sop_instance_uid for job in queue.lease("cloud", 10, "w")) == [
        "24.1",
        "24.2",
    ]


def test_study_timer_covers_every_series(index: Index, queue: JobQueue, clock: Clock) -> None:
    timer = NewTimer("study-route", "study", "1.2.3", 5.0, ("pacs",))
    batch = [make_item("22.1", series_uid="1.2.3.7"), make_item("22.2", series_uid="1.2.3.8")]
    index.record(batch, DuplicatePolicy.REJECT, None, [[timer], [timer]])
    arm(index, "22.3", timer, study_uid="9.8.7")
    clock.advance(10)
    assert queue.fire_due_timers() == 2
    assert sorted(job.sop_instance_uid for job in queue.lease("pacs", 10, "w")) == ["22.1", "22.2"]


def test_timers_survive_a_restart(url: str, clock: Clock) -> None:
    first = Index.open(url)
    arm(first, "23.1", NewTimer("stable", "series", "1.2.3.4", 30.0, ("pacs",)))
    first.close()
    reopened = Index.open(url)
    try:
        queue = make_queue(reopened, clock)
        assert queue.fire_due_timers() == 0
        clock.advance(30)
        assert queue.fire_due_timers() == 1
        assert lease_one(queue).sop_instance_uid == "23.1"
    finally:
        reopened.close()


def test_a_timer_level_must_be_series_or_study(index: Index) -> None:
    with pytest.raises(ValueError, match="series or study"):
        arm(index, "24.1", NewTimer("r", "patient", "x", 1.0, ("pacs",)))
    assert index.count_instances() == 0
