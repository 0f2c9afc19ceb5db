"""Indexes for what every replica looks up each second: webhooks due, and expired jobs to sweep.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("jobs_webhook_due", "jobs", ["webhook_next_at"])
    op.create_index("jobs_expiry", "jobs", ["expires_at"])


def downgrade() -> None:
    op.drop_index("jobs_expiry", "jobs")
    op.drop_index("jobs_webhook_due", "jobs")
