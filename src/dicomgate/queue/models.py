"""Configuration models of the delivery queue (``queue:`` in the YAML)."""

from __future__ import annotations

from pydantic import Field, model_validator

from dicomgate.models import ConfigModel as _Model


class RetryPolicy(_Model):
    """How a failed delivery is retried: exponential backoff with jitter, then dead-letter."""

    initial: float = Field(1.0, gt=0, description="Seconds to wait after the first failed attempt.")
    max: float = Field(
        60.0,
        gt=0,
        description=(
            "Longest wait between two attempts, in seconds. It bounds how long a destination"
            " that comes back waits for its backlog: about one `max`. A DICOMweb or webhook"
            " destination's `Retry-After` (on a 429 or 503) is honoured up to this long:"
            " nothing is sent to it meanwhile."
        ),
    )
    multiplier: float = Field(
        2.0, ge=1.0, description="Factor applied to the wait after each further failure."
    )
    jitter: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description=(
            "Random spread of each wait, as a fraction (0.2 = +-20 %), so that jobs that"
            " failed together do not all retry at the same instant. Never exceeds `max`."
        ),
    )
    max_attempts: int = Field(
        0,
        ge=0,
        description=(
            "Attempts before a job is dead-lettered; 0 means unlimited (bounded by `max_age`)."
        ),
    )
    max_age: float = Field(
        86400.0,
        gt=0,
        description=(
            "Seconds after its creation (or its last re-drive) past which a failing job is"
            " dead-lettered. The default rides out an outage of several hours."
        ),
    )

    @model_validator(mode="after")
    def _initial_within_max(self) -> RetryPolicy:
        if self.initial > self.max:
            raise ValueError("retry.initial must not exceed retry.max")
        return self


class QueueConfig(_Model):
    """The delivery queue shared by every destination."""

    lease_seconds: float = Field(
        300.0,
        gt=0,
        description=(
            "How long a worker owns a leased job. A job not finished in that time (crashed"
            " or hung worker) is handed out again; keep it above the slowest delivery. A node"
            " that restarts hands out its previous process's leased jobs at once."
        ),
    )
    poll_interval: float = Field(
        0.5, gt=0, description="Seconds between two looks at the queue when it is idle."
    )
    batch_wait: float = Field(
        0.05,
        ge=0,
        description=(
            "Seconds a delivery worker lets new jobs gather before it leases them: after it"
            " was woken by new jobs, and between two leases while its leases empty the queue"
            " (a steady stream), so that instances arriving one by one still go out in"
            " batches (fewer queue transactions, fuller STOW-RS requests). A backlog is sent"
            " at once. 0 sends every instance as soon as it is stored."
        ),
    )
    retry: RetryPolicy = Field(
        default_factory=RetryPolicy, description="Retry and dead-letter policy."
    )
