"""A job's trace context (W3C traceparent) at submission, so the spans of its images and its webhook link back
to the request that submitted it, on whichever replica works on them.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("traceparent", sa.Text()))


def downgrade() -> None:
    op.drop_column("jobs", "traceparent")
