"""Volume drivers: how a volume's bytes are stored, read, written and snapshotted.

Volumes live on configured backends (``backends.py``: the registry and the driver
interface). The default one keeps each volume as a sparse raw file (``rawfile.py``); a
snapshot is a sparse-aware copy of it. ``filedisk.py`` and ``blockdev.py`` serve existing
image files and block devices brought in through Cinder's manage-existing API.
"""

from blockvault.volume.rawfile import CapacityError, RawFileDriver

__all__ = ["CapacityError", "RawFileDriver"]
