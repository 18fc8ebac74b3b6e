"""index package."""

import time

# Pause between two transactions of a bulk delete or update on SQLite (queue purge and
# re-drive, audit retention): neither the index's write lock nor SQLite's busy wait is
# fair, and a committer waiting on them would otherwise lose them to the next batch again
# and again (C-STOREs waited up to 2.8 s during an audit prune, 2.2 s during a re-drive).
SQLITE_BULK_PAUSE = 0.01


def let_writers_in(sqlite: bool) -> None:
    """Between two batches of a bulk operation: on SQLite, give a waiting writer its turn
    (PostgreSQL's row locks need none)."""
    if sqlite:
        time.sleep(SQLITE_BULK_PAUSE)
