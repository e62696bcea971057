"""Alembic environment: runs on the connection handed over by Database.upgrade."""

from alembic import context
from sqlalchemy import create_engine

from blockvault.db.models import Base

config = context.config
connection = config.attributes.get("connection")


def run(conn) -> None:
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:  # command-line use: alembic -x url=...
    url = context.get_x_argument(as_dictionary=True).get("url", "sqlite:///blockvault.sqlite")
    with create_engine(url).connect() as conn:
        run(conn)
