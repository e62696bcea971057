"""Values that come from a request: integers checked once here before they reach the
database, and short excerpts of bad values for error messages.

The DB columns are 32-bit (Cinder's ``db.MAX_INT``): a larger Python int overflows the
driver (SQLite: ``OverflowError``, a 500), and a float or a boolean is not what the caller
meant. The wording is oslo's ``validate_integer``, which Cinder's API uses.
"""

from __future__ import annotations

from blockvault.service.errors import Invalid

DB_MAX_INT = 2147483647
DB_MIN_INT = -2147483648
#: how much of a bad value an error message quotes
EXCERPT_CHARS = 100
#: more digits than any valid value has; int() of a longer string is wasted work
_MAX_DIGITS = 32


def as_int(value: object) -> int | None:
    """``value`` as an int if it is one or a string of one (Cinder: ``int(str(value))``);
    None for floats (``1.9``, ``inf``), booleans, containers and non-numeric strings."""
    if isinstance(value, bool):
        return None  # int(str(True)) fails in Cinder too
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) <= _MAX_DIGITS:
        try:
            return int(value)
        except ValueError:
            return None
    return None


def validate_integer(value: object, name: str, min_value: int = DB_MIN_INT,
                     max_value: int = DB_MAX_INT) -> int:
    """``value`` as an int in ``[min_value, max_value]``, else :class:`Invalid` (400)."""
    number = as_int(value)
    if number is None:
        raise Invalid(f"{name} must be an integer")
    if number < min_value:
        raise Invalid(f"{name} must be >= {min_value}")
    if number > max_value:
        raise Invalid(f"{name} must be <= {max_value}")
    return number


def db_int(value: str, big: bool = False) -> int | None:
    """A query-string filter value as an int a column can hold, or None (no row can match)."""
    number = as_int(value)
    bound = 2**63 if big else 2**31
    if number is None or not -bound <= number < bound:
        return None
    return number


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters: an error names a bad value, it does not
    echo a 100 KB one back (once for the value, once more in the reason)."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."
