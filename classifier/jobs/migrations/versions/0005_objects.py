"""Jobs by reference: an image may be an object in S3 (its URL, read by the worker that claims it) instead of
stored bytes, and a job may name an object its results are written to when it finishes.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("job_images", sa.Column("source", sa.Text))
    op.add_column("jobs", sa.Column("results_to", sa.Text))


def downgrade() -> None:
    op.drop_column("jobs", "results_to")
    op.drop_column("job_images", "source")
