"""blockvault: a Block Storage backup service speaking the OpenStack Cinder backups API.

Layers (nothing imports upward): ``api`` (HTTP) -> ``service`` (rules) -> ``db`` (metadata)
and ``engine`` (bytes) -> ``store`` (object storage) and ``volume`` (volume drivers).
"""

__version__ = "0.1.0"
