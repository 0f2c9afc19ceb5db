"""Jobs, their images until classified, and their results.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("k", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.Column("expires_at", sa.Double),
        sa.Column("idempotency_key", sa.String(255), unique=True),
        sa.Column("webhook_url", sa.Text),
        sa.Column("webhook_delivered", sa.Boolean, nullable=False),
        sa.Column("webhook_attempts", sa.Integer, nullable=False),
        sa.Column("webhook_last_status", sa.Integer),
        sa.Column("webhook_next_at", sa.Double),
    )
    op.create_index("jobs_newest_first", "jobs", ["created_at", "id"])
    op.create_table(
        "job_images",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("index", sa.Integer, primary_key=True),
        sa.Column("filename", sa.Text),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("queued_at", sa.Double, nullable=False),
        sa.Column("leased_until", sa.Double),
        sa.Column("attempts", sa.Integer, nullable=False),
    )
    op.create_index("job_images_queue", "job_images", ["queued_at", "job_id", "index"])
    op.create_table(
        "job_results",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("index", sa.Integer, primary_key=True),
        sa.Column("failed", sa.Boolean, nullable=False),
        sa.Column("entry", sa.Text, nullable=False),
    )
