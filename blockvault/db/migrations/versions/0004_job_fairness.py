"""jobs: project (fair claims across projects), once_key (one active verify per backup)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ACTIVE = "state IN ('queued', 'running') AND once_key IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("project_id", sa.String(length=255), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("once_key", sa.String(length=255), nullable=True))
    # Existing jobs belong to their backup's project (container checks, with no backup,
    # keep ''). once_key stays NULL for them: jobs queued before the upgrade are not
    # deduplicated, and no pair of them can break the unique index below.
    op.execute(
        "UPDATE jobs SET project_id = COALESCE((SELECT backups.project_id FROM backups "
        "WHERE backups.id = jobs.backup_id), '')"
    )
    op.create_index("ix_jobs_project_state", "jobs", ["project_id", "state"])
    op.create_index("ux_jobs_active_once", "jobs", ["kind", "once_key"], unique=True,
                    sqlite_where=sa.text(_ACTIVE), postgresql_where=sa.text(_ACTIVE))


def downgrade() -> None:
    op.drop_index("ux_jobs_active_once", table_name="jobs")
    op.drop_index("ix_jobs_project_state", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("once_key")
        batch.drop_column("project_id")
