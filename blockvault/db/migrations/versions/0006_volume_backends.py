"""volumes: backend, provider_location, provider_info, owns_disk (issue 11: real disks)

Every existing volume is one of blockvault's own raw files: backend ``rawfile`` (the
embedded default backend), owned by blockvault, found by its id (no location).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("volumes") as batch:
        batch.add_column(sa.Column("backend", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("provider_location", sa.String(length=1024), nullable=True))
        batch.add_column(sa.Column("provider_info", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("owns_disk", sa.Boolean(), nullable=False,
                                   server_default=sa.true()))
    op.execute("UPDATE volumes SET backend = 'rawfile' WHERE backend IS NULL")
    # One live volume per disk: two managers racing to manage the same source cannot both
    # win (raw volumes have no location, and NULLs never collide).
    op.create_index("ix_volumes_backend_location", "volumes",
                    ["backend", "provider_location"], unique=True,
                    sqlite_where=sa.text("NOT deleted"),
                    postgresql_where=sa.text("NOT deleted"))


def downgrade() -> None:
    op.drop_index("ix_volumes_backend_location", table_name="volumes")
    with op.batch_alter_table("volumes") as batch:
        batch.drop_column("owns_disk")
        batch.drop_column("provider_info")
        batch.drop_column("provider_location")
        batch.drop_column("backend")
