"""studies.report_failure / report_failed_at: a permanently failing SR build is recorded, not retried forever

Revision ID: 0005
Revises: 0004
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("report_failure", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("report_failed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("report_failed_at")
        batch.drop_column("report_failure")
