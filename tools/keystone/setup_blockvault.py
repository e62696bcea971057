#!/usr/bin/env python3
"""Register blockvault in a Keystone as Cinder is registered: a ``service`` project, a
service user (``blockvault``, role ``service``: what Keystone's policy asks of a service
that validates tokens), the ``block-storage`` and ``volumev3`` catalog entries pointing at
blockvault, and, for tests, projects with users holding the reader, member and admin roles.
Idempotent: found things are reused, endpoints are replaced.

    python tools/keystone/setup_blockvault.py --auth-url http://127.0.0.1:35357/v3 \\
        --admin-password secret --blockvault-url http://127.0.0.1:8776 \\
        --service-password SVCPASS [--project demo --user-password PASS ...]

Prints JSON: {"service_user": ..., "projects": {name: id}, "users": {name: {...}}}.
Users are named ``<project>-reader``, ``<project>-member`` and ``<project>-admin``.
Passwords are read from the options (or BLOCKVAULT_KS_SERVICE_PASSWORD /
BLOCKVAULT_KS_USER_PASSWORD / KEYSTONE_ADMIN_PASSWORD) and never printed.
Needs keystoneauth1 (installed with blockvault's test extras).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

ROLES = ("reader", "member", "admin")


class Keystone:
    def __init__(self, auth_url: str, admin_password: str, admin_user: str = "admin",
                 admin_project: str = "admin") -> None:
        self.url = auth_url.rstrip("/")
        if not self.url.endswith("/v3"):
            self.url += "/v3"
        self.s = ks_session.Session(auth=v3.Password(
            auth_url=self.url, username=admin_user, password=admin_password,
            project_name=admin_project, user_domain_id="default",
            project_domain_id="default"))

    def _one(self, kind: str, name: str, **filters: Any) -> dict | None:
        found = self.s.get(f"{self.url}/{kind}", params={"name": name, **filters}).json()[kind]
        return found[0] if found else None

    def role(self, name: str) -> dict:
        role = self._one("roles", name)
        if role is None:
            role = self.s.post(f"{self.url}/roles", json={"role": {"name": name}}
                               ).json()["role"]
        return role

    def project(self, name: str) -> dict:
        project = self._one("projects", name, domain_id="default")
        if project is None:
            project = self.s.post(f"{self.url}/projects", json={"project": {
                "name": name, "domain_id": "default"}}).json()["project"]
        return project

    def user(self, name: str, password: str) -> dict:
        user = self._one("users", name, domain_id="default")
        if user is None:
            user = self.s.post(f"{self.url}/users", json={"user": {
                "name": name, "password": password, "domain_id": "default"}}).json()["user"]
        else:  # the password of this run, whatever an earlier run set
            self.s.patch(f"{self.url}/users/{user['id']}",
                         json={"user": {"password": password}})
        return user

    def grant(self, project: dict, user: dict, role: str) -> None:
        self.s.put(f"{self.url}/projects/{project['id']}/users/{user['id']}/roles/"
                   f"{self.role(role)['id']}")

    def service(self, type_: str, name: str, urls: dict[str, str], region: str) -> dict:
        svc = next((s for s in self.s.get(f"{self.url}/services",
                                          params={"type": type_}).json()["services"]), None)
        if svc is None:
            svc = self.s.post(f"{self.url}/services", json={"service": {
                "type": type_, "name": name, "enabled": True}}).json()["service"]
        for ep in self.s.get(f"{self.url}/endpoints",
                             params={"service_id": svc["id"]}).json()["endpoints"]:
            self.s.delete(f"{self.url}/endpoints/{ep['id']}")
        for interface, url in urls.items():
            self.s.post(f"{self.url}/endpoints", json={"endpoint": {
                "service_id": svc["id"], "interface": interface, "region_id": region,
                "url": url}})
        return svc


def setup(auth_url: str, admin_password: str, blockvault_url: str | None,
          service_password: str, projects: list[str] = (), user_password: str = "",
          region: str = "RegionOne", service_user: str = "blockvault") -> dict:
    ks = Keystone(auth_url, admin_password)
    out: dict[str, Any] = {"auth_url": ks.url, "projects": {}, "users": {}}
    for role in (*ROLES, "service"):
        ks.role(role)
    service_project = ks.project("service")
    svc_user = ks.user(service_user, service_password)
    ks.grant(service_project, svc_user, "service")
    out["service_user"] = {"name": service_user, "id": svc_user["id"],
                           "project": "service", "project_id": service_project["id"]}
    if blockvault_url:
        base = blockvault_url.rstrip("/")
        # block-storage: the 3.67-style URL without a project (openstacksdk, tempest);
        # volumev3: Cinder's classic one with the project (cinderclient). Both, as
        # devstack registers them (reference §12.1).
        for type_, name, url in (("block-storage", "cinder", f"{base}/v3"),
                                 ("volumev3", "cinderv3", f"{base}/v3/$(project_id)s")):
            ks.service(type_, name, {"public": url, "internal": url}, region)
    for name in projects:
        project = ks.project(name)
        out["projects"][name] = project["id"]
        for role in ROLES:
            user = ks.user(f"{name}-{role}", user_password)
            ks.grant(project, user, role)
            out["users"][f"{name}-{role}"] = {"id": user["id"], "project": name,
                                              "project_id": project["id"], "role": role}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--auth-url", required=True)
    p.add_argument("--admin-password", default=os.environ.get("KEYSTONE_ADMIN_PASSWORD",
                                                              "secret"))
    p.add_argument("--blockvault-url", help="where clients reach blockvault (the catalog)")
    p.add_argument("--service-user", default="blockvault")
    p.add_argument("--service-password",
                   default=os.environ.get("BLOCKVAULT_KS_SERVICE_PASSWORD"))
    p.add_argument("--project", action="append", default=[],
                   help="a project with <name>-reader/-member/-admin users (repeatable)")
    p.add_argument("--user-password", default=os.environ.get("BLOCKVAULT_KS_USER_PASSWORD"))
    p.add_argument("--region", default="RegionOne")
    a = p.parse_args()
    if not a.service_password:
        p.error("--service-password (or BLOCKVAULT_KS_SERVICE_PASSWORD) is required")
    if a.project and not a.user_password:
        p.error("--user-password (or BLOCKVAULT_KS_USER_PASSWORD) is required with --project")
    json.dump(setup(a.auth_url, a.admin_password, a.blockvault_url, a.service_password,
                    a.project, a.user_password or "", a.region, a.service_user),
              sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
