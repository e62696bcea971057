"""Service heartbeats (issue 14): the runners table records every service process

A row was a job runner; now it is any service process with its role (``binary``, in
Cinder's naming: ``cinder-backup`` for job runners, ``cinder-api`` for API processes) and
the volume backends it reaches (``backends``: HOST@BACKEND names, kept for routing jobs by
host). Existing rows are job runners, hence the server default.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runners") as batch:
        batch.add_column(sa.Column("binary", sa.String(length=64), nullable=False,
                                   server_default="cinder-backup"))
        batch.add_column(sa.Column("backends", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runners") as batch:
        batch.drop_column("backends")
        batch.drop_column("binary")
