"""Metadata database: SQLAlchemy 2 models, sessions and Alembic migrations.

SQLite in the data directory by default; PostgreSQL when several processes or hosts share
the service. The DB row is the truth about every volume, snapshot, backup and job.
"""

from blockvault.db.models import Backup, Base, Job, QuotaLimit, Snapshot, Volume
from blockvault.db.session import Database

__all__ = ["Backup", "Base", "Database", "Job", "QuotaLimit", "Snapshot", "Volume"]
