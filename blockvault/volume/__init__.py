"""Volume drivers: how a volume's bytes are stored, read, written and snapshotted.

The default driver keeps each volume as a sparse raw file; a snapshot is a sparse-aware
copy of it (a reflink where the filesystem offers one).
"""

from blockvault.volume.rawfile import CapacityError, RawFileDriver

__all__ = ["CapacityError", "RawFileDriver"]
