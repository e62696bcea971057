"""The web dashboard (``/dashboard``): server-rendered pages of a project's backups, running
jobs with live progress, schedules, storage and verify results, behind the API's own
authentication. Templates, script, styles and the vendored chart library (uPlot) ship inside
the package: no CDN, no build step."""

from blockvault.dashboard.routes import routes

__all__ = ["routes"]
