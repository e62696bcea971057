"""Request body schemas, as Cinder's (``cinder/api/schemas``), validated with jsonschema so
that error messages read exactly as Cinder's do."""

from __future__ import annotations

import base64
import binascii
import functools
import uuid
from typing import Any

import jsonschema
from jsonschema import Draft4Validator, FormatChecker

from blockvault.service.errors import Invalid
from blockvault.service.inputs import excerpt

_BOOL_VALUES = [
    True, "True", "TRUE", "true", "1", "ON", "On", "on", "YES", "Yes", "yes", "y", "t",
    False, "False", "FALSE", "false", "0", "OFF", "Off", "off", "NO", "No", "no", "n", "f",
]
TRUE_VALUES = {True, "True", "TRUE", "true", "1", "ON", "On", "on", "YES", "Yes", "yes", "y", "t"}

boolean = {"type": ["boolean", "string"], "enum": _BOOL_VALUES}
uuid_ = {"type": "string", "format": "uuid"}
uuid_allow_null = {"type": ["string", "null"], "format": "uuid"}
name = {"type": ["string", "null"], "minLength": 0, "maxLength": 255}
description = {
    "type": ["string", "null"], "minLength": 0, "maxLength": 255,
    "pattern": r"^[\s\S]*$",
}
nullable_string = {"type": ["string", "null"], "minLength": 0, "maxLength": 255}
# "$(?!\n)": a whole-string match in both Python (where "$" alone also matches before a
# final newline, so "key\n" passed) and ECMA-262, the dialect JSON Schema documents use.
metadata = {
    "type": "object",
    "patternProperties": {
        r"^[a-zA-Z0-9-_:. /]{1,255}$(?!\n)": {"type": "string", "maxLength": 255}
    },
    "additionalProperties": False,
}
metadata_allows_null = {**metadata, "type": ["object", "null"]}


def _obj(props: dict, required: tuple = (), nullable: bool = False) -> dict:
    return {
        "type": ["object", "null"] if nullable else "object",
        "properties": props,
        "required": list(required),
        "additionalProperties": False,
    }


# Versioned schemas are built once per microversion (a bounded set) and kept: the
# validator cache below holds each schema it has seen, so a new dict per request grew it
# by one validator per request, forever.
@functools.cache
def backup_create(version: tuple[int, int]) -> dict:
    props = {
        "volume_id": uuid_, "container": nullable_string, "description": description,
        "incremental": boolean, "force": boolean, "name": name, "snapshot_id": uuid_allow_null,
    }
    if version >= (3, 43):
        props["metadata"] = metadata_allows_null
    if version >= (3, 51):
        props["availability_zone"] = nullable_string
    return _obj({"backup": _obj(props, ("volume_id",))}, ("backup",))


@functools.cache
def backup_update(version: tuple[int, int]) -> dict:
    props: dict[str, Any] = {"name": name, "description": description}
    if version >= (3, 43):
        props["metadata"] = metadata
    # Cinder's schema lets {"backup": null} through and then crashes (500): refuse it.
    return _obj({"backup": _obj(props)}, ("backup",))


# Cinder's schema lets {"restore": null} through and then crashes (500): refuse it.
restore = _obj({"restore": _obj({"name": name, "volume_id": uuid_allow_null})}, ("restore",))
import_record = _obj(
    {
        "backup-record": _obj(
            {
                "backup_service": {"type": "string", "minLength": 0, "maxLength": 255},
                "backup_url": {"type": "string", "minLength": 1, "format": "base64"},
            },
            ("backup_service", "backup_url"),
        )
    },
    ("backup-record",),
)
container_verification = _obj(
    {"verification": _obj({"container": {"type": "string", "minLength": 1, "maxLength": 255}},
                          ("container",))},
    ("verification",),
)
reset_status = _obj(
    {"os-reset_status": _obj({"status": {"type": "string", "format": "backup_status"}},
                             ("status",))},
    ("os-reset_status",),
)
volume_reset_status = _obj(
    {"os-reset_status": {"type": "object", "properties": {"status": {"type": "string"}},
                         "required": ["status"]}},
    ("os-reset_status",),
)
#: an action body names exactly one action
single_action = {"type": "object", "minProperties": 1, "maxProperties": 1}
quota_set = {
    "type": "object",
    "properties": {"quota_set": {"type": "object"}},
    "required": ["quota_set"],
}

_checker = FormatChecker()


@_checker.checks("uuid")
def _is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@_checker.checks("base64")
def _is_base64(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False
    return True


@_checker.checks("backup_status")
def _is_backup_status(value: object) -> bool:
    return not isinstance(value, str) or value.lower() in ("available", "error")


#: one validator per schema object; schemas are module-level or cached above, so this
#: stays a few dozen entries. Past the bound a validator is built and not kept, so a
#: caller that builds schemas per request costs time, not memory.
_validators: dict[int, tuple[dict, Draft4Validator]] = {}
_MAX_VALIDATORS = 256


def _validator(schema: dict) -> Draft4Validator:
    cached = _validators.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    validator = Draft4Validator(schema, format_checker=_checker)
    if len(_validators) < _MAX_VALIDATORS:
        # the schema is kept with its validator, so its id is never reused by another
        _validators[id(schema)] = (schema, validator)
    return validator


def validate(schema: dict, body: Any) -> None:
    """Raise :class:`Invalid` with Cinder's wording if ``body`` breaks ``schema``.

    Cinder quotes the bad value twice (``Value: <v>. '<v>' is too long``); here each quote
    is an excerpt, so a 100 KB value gives a short message that still names the field.
    """
    try:
        _validator(schema).validate(body)
    except jsonschema.ValidationError as ex:
        reason = _short_reason(ex)
        if len(ex.path) > 0:
            raise Invalid(
                f"Invalid input for field/attribute {excerpt(ex.path[-1])}. "
                f"Value: {excerpt(ex.instance)}. {reason}"
            ) from None
        raise Invalid(reason) from None


def _short_reason(ex: jsonschema.ValidationError) -> str:
    """jsonschema's message with its repr of the value cut to an excerpt."""
    message = ex.message
    whole = repr(ex.instance)
    if len(whole) > 100:
        message = message.replace(whole, excerpt(whole))
    return excerpt(message, 300)


def is_true(value: Any) -> bool:
    return value in TRUE_VALUES


def strip(value: str | None) -> str | None:
    return value.strip() if isinstance(value, str) else value

