"""API versions: the versions document and microversion negotiation (reference §1.2-1.3)."""

from __future__ import annotations

import re

from blockvault.api.faults import HTTPFault

MIN_VERSION = (3, 0)
MAX_VERSION = (3, 71)
_VERSION_RE = re.compile(r"([1-9]\d*)\.([1-9]\d*|0)")  # fullmatch: "$" passes "\n"


def fmt(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def negotiate(header: str | None) -> tuple[int, int]:
    """The microversion a v3 request asks for; 3.0 without a header."""
    if not header:
        return MIN_VERSION
    wanted = None
    for piece in header.split(","):
        piece = piece.strip()
        if "volume" in piece:
            wanted = piece.split(None, 1)[1].strip() if " " in piece else ""
            break
    if wanted is None:
        return MIN_VERSION
    if wanted.lower() == "latest":
        return MAX_VERSION
    m = _VERSION_RE.fullmatch(wanted)
    if not m:
        raise HTTPFault(
            400,
            f"API Version String {wanted} is of invalid format. Must be of format "
            "MajorNum.MinorNum.",
        )
    version = (int(m.group(1)), int(m.group(2)))
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise HTTPFault(
            406,
            f"Version {wanted} is not supported by the API. Minimum is {fmt(MIN_VERSION)} "
            f"and maximum is {fmt(MAX_VERSION)}.",
            headers={"OpenStack-API-Version": f"volume {wanted}",
                     "Vary": "OpenStack-API-Version"},
        )
    return version


def _document(base: str, major: int, status: str, min_version: str, version: str,
              updated: str) -> dict:
    return {
        "versions": [
            {
                "id": f"v{major}.0",
                "links": [
                    {"href": "https://docs.openstack.org/", "rel": "describedby",
                     "type": "text/html"},
                    {"href": f"{base}/v{major}/", "rel": "self"},
                ],
                "media-types": [
                    {"base": "application/json",
                     "type": f"application/vnd.openstack.volume+json;version={major}"}
                ],
                "min_version": min_version,
                "status": status,
                "updated": updated,
                "version": version,
            }
        ]
    }


def versions_document(base: str) -> dict:
    return _document(base, 3, "CURRENT", fmt(MIN_VERSION), fmt(MAX_VERSION),
                     "2023-08-31T00:00:00Z")


def v2_document(base: str) -> dict:
    return _document(base, 2, "DEPRECATED", "", "", "2017-02-25T12:00:00Z")
