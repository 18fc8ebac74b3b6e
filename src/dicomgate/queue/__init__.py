"""Durable delivery queue: jobs per (instance, destination) in the index database."""

from __future__ import annotations

from dicomgate.queue.jobs import AttemptOutcome, Job, JobQueue, JobState, NewJob, NewTimer, backoff
from dicomgate.queue.models import QueueConfig, RetryPolicy

__all__ = [
    "AttemptOutcome",
    "Job",
    "JobQueue",
    "JobState",
    "NewJob",
    "NewTimer",
    "QueueConfig",
    "RetryPolicy",
    "backoff",
]
