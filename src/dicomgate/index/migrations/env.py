"""Alembic environment of the index database.

Run only through :func:`dicomgate.index.db.migrate`, which hands over an open connection in
``config.attributes["connection"]``; there is no alembic.ini.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from dicomgate.index.schema import metadata

# Any 64-bit constant: nodes sharing one PostgreSQL database migrate one at a time.
_MIGRATION_LOCK_ID = 0x646963_6F6D67


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
            )
        context.run_migrations()


connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("index migrations run through dicomgate.index.db.migrate()")
_run(connection)
