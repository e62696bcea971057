"""List queries as Cinder answers them: scope, filters, sorting, keyset pagination with
``marker``, ``offset``, ``limit`` and ``with_count`` (reference §6)."""

from __future__ import annotations

import collections
import datetime as dt
import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Integer,
    String,
    and_,
    false,
    func,
    or_,
    select,
)
from sqlalchemy.orm import Session

from blockvault.service.context import RequestContext
from blockvault.service.errors import Invalid, NotFound, invalid_input
from blockvault.service.inputs import DB_MAX_INT, as_int, db_int, excerpt

TRUE_STRINGS = ("1", "t", "true", "on", "y", "yes")
FALSE_STRINGS = ("0", "f", "false", "off", "n", "no")
_RESERVED = {"limit", "marker", "offset", "sort", "sort_key", "sort_dir", "all_tenants"}


def parse_bool(value: str) -> bool | None:
    v = value.strip().lower()
    if v in TRUE_STRINGS:
        return True
    if v in FALSE_STRINGS:
        return False
    return None


@dataclass(frozen=True)
class ListSpec:
    """What differs between the resources listed this way."""

    model: Any
    #: filter keys a non-admin may use (``resource_filters.json``)
    user_filters: tuple[str, ...]
    #: API name -> column attribute name
    renames: dict[str, str]
    not_found: str  # "Backup", "Volume", "Snapshot" (for the marker message)
    #: the attributes a list's views read (None: all). Each column read is decoded for
    #: every row of a page: a backup's ``volume_meta`` JSON alone was a tenth of a
    #: 1000-row page.
    columns: tuple[str, ...] | None = None


@dataclass
class Page:
    items: list[Any]
    count: int | None
    has_next: bool


def list_resources(
    s: Session,
    ctx: RequestContext,
    spec: ListSpec,
    params: dict[str, str],
    version: tuple[int, int],
    max_limit: int,
) -> Page:
    model = spec.model
    params = dict(params)
    columns = {c.key: c for c in model.__table__.columns}
    attr_of = {c.name: attr for attr, c in model.__mapper__.columns.items()}

    # -- scope ------------------------------------------------------------------------
    all_tenants = False
    if "all_tenants" in params:
        raw = params.pop("all_tenants")
        if ctx.is_admin:
            parsed = parse_bool(raw)
            if parsed is None:
                raise Invalid(f"all_tenants must be a boolean, got '{excerpt(raw)}'.")
            all_tenants = parsed

    # -- with_count ---------------------------------------------------------------------
    with_count = False
    if version >= (3, 45) and "with_count" in params:
        raw = params.pop("with_count")
        parsed = parse_bool(raw)
        if parsed is None:
            raise Invalid(f"Value '{excerpt(raw)}' for 'with_count' is not a boolean.")
        with_count = parsed

    # -- pagination params ---------------------------------------------------------------
    limit = max_limit
    if "limit" in params:
        parsed_limit = as_int(params["limit"])
        if parsed_limit is None:
            raise Invalid("limit param must be an integer")
        if parsed_limit < 0:
            raise Invalid("limit param must be positive")
        limit = min(parsed_limit, max_limit)
    offset = 0
    if "offset" in params:
        parsed_offset = as_int(params["offset"])
        if parsed_offset is None:
            raise Invalid("offset must be an integer")
        if parsed_offset < 0:
            raise Invalid("offset must be >= 0")
        if parsed_offset > DB_MAX_INT:
            raise Invalid(f"offset must be <= {DB_MAX_INT}")
        offset = parsed_offset
    marker = params.get("marker")
    sort = _sort_keys(params, version)

    # -- filters ------------------------------------------------------------------------
    filters = {k: v for k, v in params.items() if k not in _RESERVED}
    if any(not k.isascii() for k in filters):
        raise Invalid("Filter keys can only contain ASCII characters.")
    if not ctx.is_admin:
        if version >= (3, 31):
            bad = [k for k in filters if k not in spec.user_filters]
            if bad:
                raise Invalid(
                    f"Invalid filters {','.join(sorted(bad))} are found in query options."
                )
        else:
            filters = {k: v for k, v in filters.items() if k in spec.user_filters}

    # Named tuples, not ORM instances: a page is only read, and building 1000 instances
    # (identity map, state tracking) cost ~90% of a 1000-row detail page; nor SQLAlchemy's
    # rows, whose attributes cost a view of twenty of them 5 µs per item. The models have no
    # relationships or properties, so a tuple reads as the instance would.
    keys = spec.columns or tuple(model.__mapper__.columns.keys())
    stmt = select(*[getattr(model, key) for key in keys])
    stmt = stmt.where(model.deleted.is_(False))
    if not (ctx.is_admin and all_tenants):
        stmt = stmt.where(model.project_id == ctx.project_id)
    for key, value in filters.items():
        like = version >= (3, 34) and key.endswith("~")
        name = key[:-1] if like else key
        name = spec.renames.get(name, name)
        if name not in columns:
            return Page([], 0 if with_count else None, False)  # Cinder: unknown column -> empty
        col = getattr(model, attr_of.get(name, name))
        condition = _filter(col, columns[name].type, value, like)
        if condition is None:  # a value the column cannot hold matches no row
            return Page([], 0 if with_count else None, False)
        stmt = stmt.where(condition)

    count = None
    if with_count:
        count = s.scalar(select(func.count()).select_from(stmt.subquery()))

    # -- sort and keyset ----------------------------------------------------------------
    order_cols = []
    for key, direction in sort:
        key = spec.renames.get(key, key)
        if key not in columns or isinstance(columns[key].type, JSON):
            # JSON columns are blockvault's own (Cinder keeps metadata in tables of
            # their own) and have no order to page by.
            raise invalid_input("Invalid sort key")
        order_cols.append((getattr(model, attr_of.get(key, key)), direction))
    if marker is not None:
        marker_row = s.get(model, marker)
        visible = marker_row is not None and not marker_row.deleted
        if visible and not (ctx.is_admin and all_tenants):
            visible = marker_row.project_id == ctx.project_id
        if not visible:
            raise NotFound(f"Marker {excerpt(marker)} could not be found.")
        stmt = stmt.where(_after(marker_row, order_cols))
    stmt = stmt.order_by(
        *[c.asc().nulls_first() if d == "asc" else c.desc().nulls_last() for c, d in order_cols]
    )
    stmt = stmt.offset(offset).limit(limit)
    row = _row_type(spec.not_found, keys)
    items = [row._make(r) for r in s.execute(stmt)]
    item_count = count if with_count else len(items)
    has_next = bool(items) and limit <= (item_count or 0)
    return Page(items, count, has_next)


@functools.cache
def _row_type(name: str, keys: tuple[str, ...]) -> Any:
    return collections.namedtuple(f"{name}Row", keys)


def _sort_keys(params: dict[str, str], version: tuple[int, int]) -> list[tuple[str, str]]:
    sort = params.get("sort")
    if sort is not None and ("sort_key" in params or "sort_dir" in params):
        raise Invalid(
            "The 'sort_key' and 'sort_dir' parameters are deprecated and cannot be used with "
            "the 'sort' parameter."
        )
    keys: list[tuple[str, str]] = []
    if sort is not None:
        for part in sort.split(","):
            key, _, direction = part.strip().partition(":")
            keys.append((key.strip(), (direction or "desc").strip().lower()))
    else:
        keys.append(
            (params.get("sort_key", "created_at").strip(), params.get("sort_dir", "desc").lower())
        )
    out = []
    for key, direction in keys:
        if direction not in ("asc", "desc"):
            raise invalid_input("Unknown sort direction, must be 'desc' or 'asc'.")
        if key == "name":
            if version < (3, 37):
                raise invalid_input("Invalid sort key")
        out.append((key, direction))
    first_dir = out[0][1]
    names = {k for k, _ in out}
    for tie in ("created_at", "id"):
        if tie not in names:
            out.append((tie, first_dir))
    return out


def _filter(col: Any, type_: Any, value: str, like: bool) -> Any:
    """``col`` matches ``value`` (a query-string text), or None when no row can match.

    The value is converted to what the column holds before it reaches the database: a
    number beyond the column's range overflows the driver, a non-boolean fails SQLAlchemy's
    Boolean, a non-date fails DateTime, NUL fails PostgreSQL's text — each a 500 otherwise.
    Cinder answers such values with an empty list (nothing matches), and so do we.
    """
    if "\x00" in value:
        return None
    if like:
        return col.like(f"%{value}%") if isinstance(type_, String) else None
    if isinstance(type_, Boolean):
        flag = parse_bool(value)
        return None if flag is None else col.is_(flag)
    if isinstance(type_, Integer):
        number = db_int(value, big=isinstance(type_, BigInteger))
        return None if number is None else col == number
    if isinstance(type_, DateTime):
        try:
            when = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if when.tzinfo is not None:  # stored as naive UTC
            when = when.astimezone(dt.UTC).replace(tzinfo=None)
        return col == when
    return col == value


def _beyond(col: Any, value: Any, direction: str) -> Any:
    """``col`` strictly after ``value`` in ``direction``, NULLs aside. Booleans have only
    ``=``/``IS`` in SQLAlchemy (``col > True`` is an ArgumentError): spelt out as equality."""
    if isinstance(value, bool):
        if direction == "asc":
            return false() if value else col.is_(True)
        return col.is_(False) if value else false()
    return col > value if direction == "asc" else col < value


def _after(row: Any, order_cols: list) -> Any:
    """Rows strictly after ``row`` in the order (NULLS FIRST asc, NULLS LAST desc)."""
    clauses = []
    for i, (col, direction) in enumerate(order_cols):
        equal = [
            (c.is_(None) if getattr(row, c.key) is None else c == getattr(row, c.key))
            for c, _ in order_cols[:i]
        ]
        value = getattr(row, col.key)
        if direction == "asc":
            beyond = col.is_not(None) if value is None else _beyond(col, value, "asc")
        else:
            beyond = false() if value is None else or_(_beyond(col, value, "desc"),
                                                       col.is_(None))
        clauses.append(and_(*equal, beyond))
    return or_(*clauses)
