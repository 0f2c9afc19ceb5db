"""The model version a job was submitted to: only a replica serving that version works on its images, so no job's
results come from two models. Jobs from before this revision have none, and any replica takes them.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("model_version", sa.String(32)))


def downgrade() -> None:
    op.drop_column("jobs", "model_version")
