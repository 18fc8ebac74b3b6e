"""Delivery workers batch a steady stream of jobs instead of chasing it one job a turn.

A real queue on SQLite; the destination is a recording sender (the unit under test is the
worker loop, not a protocol). Instances arrive every few milliseconds while each send takes
about as long, as with storescu -> gateway -> storescp on loopback.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from tests.unit.test_queue_jobs import make_item

from dicomgate.config import DuplicatePolicy
from dicomgate.egress.base import Delivery, Outcome
from dicomgate.egress.dispatcher import Dispatcher
from dicomgate.index.db import Index
from dicomgate.queue import JobQueue, NewJob, QueueConfig
from dicomgate.store.filestore import ContentStore

INSTANCES = 60


class RecordingSender:
    """Takes ``send_seconds`` per call, delivers everything, remembers each batch's size."""

    name = "pacs"
    max_batch = 16
    concurrency = 2

    def __init__(self, send_seconds: float, max_batch: int = 16) -> None:
        self.send_seconds = send_seconds
        self.max_batch = max_batch
        self.batches: list[int] = []
        self.started: list[float] = []  # time.monotonic() at the start of each send

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        self.started.append(time.monotonic())
        await asyncio.sleep(self.send_seconds)
        self.batches.append(len(batch))
        return [Outcome(d.job_id, True) for d in batch]

    async def close(self) -> None:
        return None


async def _stream(
    tmp_path: Path,
    batch_wait: float,
    sender: RecordingSender | None = None,
    instances: int = INSTANCES,
    every: float = 0.004,
) -> tuple[list[int], float]:
    """Store ``instances`` jobs one by one, ``every`` seconds apart, announcing each; wait
    until all are sent. Returns the batch sizes and how long the stream lasted."""
    index = Index.open(f"sqlite:///{tmp_path}/index.db")
    sender = sender or RecordingSender(send_seconds=0.004)
    dispatcher = Dispatcher(
        JobQueue(index.engine, QueueConfig()),
        {"pacs": sender},
        ContentStore(tmp_path / "data"),
        batch_wait=batch_wait,
    )
    await dispatcher.start()
    began = time.monotonic()
    try:
        for n in range(instances):
            item = make_item(f"1.2.3.4.5.{n}")
            await asyncio.to_thread(
                index.record, [item], DuplicatePolicy.REJECT, [[NewJob("pacs", "all", 0)]]
            )
            dispatcher.notify(["pacs"])
            await asyncio.sleep(every)
        lasted = time.monotonic() - began
        for _ in range(500):
            if sum(sender.batches) >= instances:
                break
            await asyncio.sleep(0.01)
    finally:
        await dispatcher.stop()
        index.close()
    assert sum(sender.batches) == instances
    return sender.batches, lasted


def test_a_steady_stream_goes_out_in_batches(tmp_path: Path) -> None:
    batches, lasted = asyncio.run(_stream(tmp_path, batch_wait=0.05))
    # Chasing the stream (the next lease right after each send) took one turn per one or
    # two jobs: 40-53 turns for 60 jobs in ~0.4 s here. The collector leases once per
    # batch_wait: about eight turns. (A slower machine stretches the stream, and the turns
    # with it: the bound follows the stream's length.)
    assert len(batches) <= lasted / 0.05 + 4, (batches, lasted)


def test_a_send_longer_than_batch_wait_is_followed_by_the_next_lease_at_once(
    tmp_path: Path,
) -> None:
    # A slow destination: the collector leases at most once per batch_wait, counted from
    # its previous lease, so the jobs that arrived during a 0.4 s send go out right after
    # it (a wait of batch_wait after each send made every turn 0.9 s here).
    sender = RecordingSender(send_seconds=0.4, max_batch=64)
    asyncio.run(_stream(tmp_path, 0.5, sender, instances=80, every=0.025))
    gaps = [b - a for a, b in zip(sender.started, sender.started[1:], strict=False)]
    assert gaps and statistics.median(gaps) < 0.7, gaps


def test_batch_wait_zero_sends_each_job_as_soon_as_it_is_stored(tmp_path: Path) -> None:
    batches, _ = asyncio.run(_stream(tmp_path, batch_wait=0.0))
    assert max(batches) <= 3, batches


class FailFirstSender(RecordingSender):
    """Refuses each job's first attempt (retryable), then delivers it."""

    def __init__(self) -> None:
        super().__init__(send_seconds=0.001)
        self.refused: set[int] = set()

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        await asyncio.sleep(self.send_seconds)
        outcomes = []
        for d in batch:
            if d.job_id in self.refused:
                outcomes.append(Outcome(d.job_id, True))
            else:
                self.refused.add(d.job_id)
                outcomes.append(Outcome(d.job_id, False, True, "HTTP 500"))
        self.batches.append(sum(o.delivered for o in outcomes))
        return outcomes


async def _retried(tmp_path: Path) -> int:
    index = Index.open(f"sqlite:///{tmp_path}/index.db")
    sender = FailFirstSender()
    config = QueueConfig.model_validate({"retry": {"initial": 0.1, "max": 0.2, "jitter": 0}})
    dispatcher = Dispatcher(
        JobQueue(index.engine, config),
        {"pacs": sender},
        ContentStore(tmp_path / "data"),
        poll_interval=0.2,
    )
    await dispatcher.start()
    try:
        items = [make_item(f"1.2.3.4.6.{n}") for n in range(6)]
        jobs = [[NewJob("pacs", "all", 0)] for _ in items]
        await asyncio.to_thread(index.record, items, DuplicatePolicy.REJECT, jobs)
        # Two announcements before either worker runs wake both: both collect at first.
        dispatcher.notify(["pacs"])
        dispatcher.notify(["pacs"])
        for _ in range(300):
            if sum(sender.batches) >= len(items):
                break
            await asyncio.sleep(0.01)
    finally:
        await dispatcher.stop()
        index.close()
    return sum(sender.batches)


def test_jobs_due_for_retry_are_leased_when_two_workers_collected(tmp_path: Path) -> None:
    # Retries are not announced: the idle poll must find them. A worker that stopped
    # leasing while still counted as collecting kept both asleep for good.
    assert asyncio.run(_retried(tmp_path)) == 6


class PoisonSender(RecordingSender):
    """Raises for any batch holding the instance ``poison`` (a bug, or an instance the
    protocol code cannot cope with); delivers the rest."""

    def __init__(self, poison: str) -> None:
        super().__init__(send_seconds=0.0)
        self.poison = poison

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        if any(d.sop_instance_uid == self.poison for d in batch):
            raise NotImplementedError("cannot cope")
        return await super().send(batch)


def test_a_sender_raising_for_one_instance_delivers_the_others(tmp_path: Path) -> None:
    """The batch is sent again one at a time: only the instance it raises for is retried
    (an internal error); before, every retry of the whole batch raised again."""

    async def run() -> dict[str, str]:
        index = Index.open(f"sqlite:///{tmp_path}/index.db")
        queue = JobQueue(index.engine, QueueConfig())
        sender = PoisonSender("1.2.3.4.5.3")
        dispatcher = Dispatcher(queue, {"pacs": sender}, ContentStore(tmp_path / "data"))
        items = [make_item(f"1.2.3.4.5.{n}") for n in range(6)]
        await asyncio.to_thread(
            index.record, items, DuplicatePolicy.REJECT, [[NewJob("pacs", "all", 0)]] * 6
        )
        await dispatcher.start()
        try:
            for _ in range(500):
                if sum(sender.batches) >= 5:
                    break
                await asyncio.sleep(0.01)
        finally:
            await dispatcher.stop()
        jobs = {
            j["sop_instance_uid"]: f"{j['state']} at attempt {j['attempts']}: {j['last_error']}"
            for j in queue.list()
        }
        index.close()
        return jobs

    jobs = asyncio.run(run())
    # Delivered by the first attempt: before, they failed with the poison instance and were
    # delivered only once a retry's jitter leased them apart from it.
    assert sorted(uid for uid, what in jobs.items() if what.startswith("done at attempt 1")) == [
        f"1.2.3.4.5.{n}" for n in (0, 1, 2, 4, 5)
    ]
    assert "internal error: NotImplementedError" in jobs["1.2.3.4.5.3"]
