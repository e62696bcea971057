"""Indexes in the order lists are read (issue 14: an API that stays fast at 100k backups)

Every list of backups, volumes, snapshots and schedules filters on (project_id, deleted) and
pages in ``created_at, id`` order, newest first by default (blockvault.service.listing); an
index holding exactly that order lets a page read ``limit`` rows instead of sorting all of
a project's. Backups also get one per filter a non-admin may use (status, volume_id, name:
the name index serves ``sort=name`` too) and one for an admin's all-projects list.

PostgreSQL keeps sort columns ``DESC NULLS LAST``: Cinder's order puts NULLs first going up
and last going down, which is this index read forwards (desc) or backwards (asc). SQLite's
ascending index already orders NULLs that way in both directions.

ix_backups_project_deleted is a prefix of ix_backups_list and goes.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: name, table, equality columns, order columns (as in blockvault.db.models)
INDEXES = (
    ("ix_backups_list", "backups", ("project_id", "deleted"), ("created_at", "id")),
    ("ix_backups_list_status", "backups", ("project_id", "deleted", "status"),
     ("created_at", "id")),
    ("ix_backups_list_volume", "backups", ("project_id", "deleted", "volume_id"),
     ("created_at", "id")),
    ("ix_backups_list_name", "backups", ("project_id", "deleted"),
     ("display_name", "created_at", "id")),
    ("ix_backups_list_all", "backups", ("deleted",), ("created_at", "id")),
    ("ix_volumes_list", "volumes", ("project_id", "deleted"), ("created_at", "id")),
    ("ix_snapshots_list", "snapshots", ("project_id", "deleted"), ("created_at", "id")),
    ("ix_backup_schedules_list", "backup_schedules", ("project_id", "deleted"),
     ("created_at", "id")),
)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for name, table, equal, order in INDEXES:
        ordered = [sa.text(f"{c} DESC NULLS LAST") for c in order] if postgres else list(order)
        op.create_index(name, table, [*equal, *ordered])
    op.drop_index("ix_backups_project_deleted", table_name="backups")


def downgrade() -> None:
    op.create_index("ix_backups_project_deleted", "backups", ["project_id", "deleted"])
    for name, table, _equal, _order in reversed(INDEXES):
        op.drop_index(name, table_name=table)
