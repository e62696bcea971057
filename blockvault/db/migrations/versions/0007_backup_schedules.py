"""backup_schedules table and backups.schedule_id (issue 12: scheduled backups, retention)

Existing backups were made by API calls: their schedule_id stays NULL.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backup_schedules",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("project_id", sa.String(255), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("description", sa.String(255), nullable=True),
        sa.Column("volume_ids", sa.JSON(), nullable=True),
        sa.Column("volume_metadata_key", sa.String(255), nullable=True),
        sa.Column("cron", sa.String(255), nullable=True),
        sa.Column("interval_seconds", sa.Integer(), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=False, server_default="UTC"),
        sa.Column("full_every", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("container", sa.String(255), nullable=True),
        sa.Column("keep_last", sa.Integer(), nullable=True),
        sa.Column("keep_hourly", sa.Integer(), nullable=True),
        sa.Column("keep_daily", sa.Integer(), nullable=True),
        sa.Column("keep_weekly", sa.Integer(), nullable=True),
        sa.Column("keep_monthly", sa.Integer(), nullable=True),
        sa.Column("keep_yearly", sa.Integer(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("next_run_at", sa.DateTime(), nullable=False),
        sa.Column("last_run_at", sa.DateTime(), nullable=True),
        sa.Column("last_success_at", sa.DateTime(), nullable=True),
        sa.Column("last_outcome", sa.String(16), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_backups_made", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_backups_pruned", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_run_backup_ids", sa.JSON(), nullable=True),
        sa.Column("runs_total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failures_total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("misses_total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=True),
        sa.Column("deleted", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_backup_schedules_project_id", "backup_schedules", ["project_id"])
    op.create_index("ix_backup_schedules_next_run_at", "backup_schedules", ["next_run_at"])
    with op.batch_alter_table("backups") as batch:
        batch.add_column(sa.Column("schedule_id", sa.String(36), nullable=True))
    op.create_index("ix_backups_schedule_id", "backups", ["schedule_id"])


def downgrade() -> None:
    op.drop_index("ix_backups_schedule_id", table_name="backups")
    with op.batch_alter_table("backups") as batch:
        batch.drop_column("schedule_id")
    op.drop_index("ix_backup_schedules_next_run_at", table_name="backup_schedules")
    op.drop_index("ix_backup_schedules_project_id", table_name="backup_schedules")
    op.drop_table("backup_schedules")
