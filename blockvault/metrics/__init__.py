"""Prometheus metrics (``GET /metrics``, docs/operations.md): one registry per running
service (``registry.Metrics``), holding what this process counts as it works
(``instruments``) and what the metadata database says at scrape time (``state``)."""
