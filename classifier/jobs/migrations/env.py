"""Alembic's environment: migrations run on the connection store.JobStore.upgrade() hands over."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit("Migrations run at the service's start-up (classifier.jobs.store.JobStore.upgrade), on JOBS_DATABASE_URL.")
# render_as_batch: SQLite can alter a table only by copying it, which batch mode does.
context.configure(connection=connection, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
