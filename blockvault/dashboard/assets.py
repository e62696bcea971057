"""The dashboard's static files: a fixed list, read from the package once, each served at
``/dashboard/static/{name}?v={digest}``. The digest is of the content, so a browser may keep
a file for a year and still never runs an old script with a new page; and a fixed list
means no path from a request ever reaches the filesystem."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

#: name in the URL -> (file under static/, media type)
FILES = {
    "dashboard.js": ("dashboard.js", "text/javascript"),
    "dashboard.css": ("dashboard.css", "text/css"),
    "uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript"),
    "uPlot.min.css": ("vendor/uplot/uPlot.min.css", "text/css"),
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    digest: str


class Assets:
    def __init__(self) -> None:
        root = resources.files("blockvault.dashboard") / "static"
        self.files: dict[str, Asset] = {}
        for name, (path, media_type) in FILES.items():
            body = root.joinpath(*path.split("/")).read_bytes()
            self.files[name] = Asset(body, media_type, hashlib.sha256(body).hexdigest()[:16])

    def url(self, name: str) -> str:
        """``name?v=digest``, relative to ``/dashboard/static/``."""
        return f"{name}?v={self.files[name].digest}"

    async def serve(self, request: Request) -> Response:
        asset = self.files.get(request.path_params["name"])
        if asset is None:
            raise HTTPException(404)  # the app's 404: a Cinder fault body
        etag = f'"{asset.digest}"'
        if request.query_params.get("v") == asset.digest:
            cache = "public, max-age=31536000, immutable"
        else:  # an old or missing version: revalidate every time
            cache = "no-cache"
        headers = {"ETag": etag, "Cache-Control": cache, "X-Content-Type-Options": "nosniff"}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        media = asset.media_type + "; charset=utf-8"
        return Response(asset.body, media_type=media, headers=headers)
