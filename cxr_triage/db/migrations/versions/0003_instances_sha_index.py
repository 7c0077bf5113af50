"""index instances by content hash (spool adoption scan)

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_instances_file_sha256", "instances", ["file_sha256"])


def downgrade() -> None:
    op.drop_index("ix_instances_file_sha256", table_name="instances")
