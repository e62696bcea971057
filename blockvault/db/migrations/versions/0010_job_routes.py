"""Routing jobs to the host that holds the volume (issue 14)

``volumes.host``: the HOST of a volume's HOST@BACKEND#POOL, recorded when it is made or
managed (rows from before stay NULL: they are on the host of the process that reads them,
as before). ``jobs.route``: the HOST@BACKEND a job's volume is on; only a runner announcing
that name in its heartbeat (``runners.backends``) claims it. NULL for jobs that touch no
volume, and for jobs queued before: any runner, as before.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("volumes") as batch:
        batch.add_column(sa.Column("host", sa.String(length=255), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("route", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("route")
    with op.batch_alter_table("volumes") as batch:
        batch.drop_column("host")
