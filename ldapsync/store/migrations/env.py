"""Alembic environment: the engine comes from ldapsync (see ldapsync.store.migrate)."""

from alembic import context

from ldapsync.store.tables import metadata

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
