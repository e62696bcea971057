"""Authorization: oslo.policy with Cinder's rule names and Cinder's current defaults, so an
operator's Cinder ``policy.yaml`` carries over unchanged (docs/policy.md).

Every service call names its rule and the project it acts on (the resource's, or the
caller's for lists and creates); the check strings are Cinder's "xena" ones, which read the
caller's roles (Keystone's implied roles included) and compare ``project_id``.
"""

from __future__ import annotations

import logging
import os
import textwrap
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from oslo_config import cfg
from oslo_policy import policy as oslo_policy

from blockvault.service.errors import Forbidden

log = logging.getLogger("blockvault.policy")

# -- check strings (Cinder's cinder/policies/base.py) ------------------------------------------

ADMIN_API = "rule:admin_api"
#: Cinder's SYSTEM_READER_OR_PROJECT_READER as it is today (the "xena" rule)
READER = "rule:xena_system_admin_or_project_reader"
#: Cinder's SYSTEM_ADMIN_OR_PROJECT_MEMBER as it is today
MEMBER = "rule:xena_system_admin_or_project_member"

#: The named rules the check strings refer to. ``admin_or_owner`` and
#: ``system_or_domain_or_project_admin`` are Cinder's legacy ones, referred to by no default:
#: they are registered so that an operator's older policy file naming them still works.
BASE_RULES = [
    oslo_policy.RuleDefault(
        "context_is_admin", "role:admin",
        description="Decides what is required for the 'is_admin:True' check to succeed "
                    "(all_tenants, admin-only filters and fields)."),
    oslo_policy.RuleDefault(
        "admin_api", "is_admin:True or (role:admin and is_admin_project:True)",
        description="Default rule for most Admin APIs."),
    oslo_policy.RuleDefault(
        "xena_system_admin_or_project_reader",
        "(role:admin) or (role:reader and project_id:%(project_id)s)",
        description="NOTE: this purely role-based rule recognizes only project scope"),
    oslo_policy.RuleDefault(
        "xena_system_admin_or_project_member",
        "(role:admin) or (role:member and project_id:%(project_id)s)",
        description="NOTE: this purely role-based rule recognizes only project scope"),
    oslo_policy.RuleDefault(
        "admin_or_owner",
        "is_admin:True or (role:admin and is_admin_project:True) or "
        "project_id:%(project_id)s",
        description="Cinder's legacy default rule for most non-Admin APIs (used by no "
                    "default here; kept for older policy files that name it)."),
    oslo_policy.RuleDefault(
        "system_or_domain_or_project_admin",
        "(role:admin and system_scope:all) or (role:admin and domain_id:%(domain_id)s) or "
        "(role:admin and project_id:%(project_id)s)",
        description="Cinder's legacy rule for admins of cloud, domain or a project (used by "
                    "no default here; kept for older policy files that name it)."),
]
LEGACY_BASE_RULES = ("admin_or_owner", "system_or_domain_or_project_admin")


def _rule(name: str, check: str, description: str, *ops: tuple[str, str]) -> Any:
    return oslo_policy.DocumentedRuleDefault(
        name=name, check_str=check, description=description,
        operations=[{"method": m, "path": p} for m, p in ops],
    )


#: Every rule a service call enforces; ``blockvault:`` rules are this service's extensions.
API_RULES = [
    # backups (cinder/policies/backups.py, backup_actions.py)
    _rule("backup:get_all", READER, "List backups.",
          ("GET", "/backups"), ("GET", "/backups/detail")),
    _rule("backup:backup_project_attribute", ADMIN_API,
          "List backups or show backup with project attributes.",
          ("GET", "/backups/{backup_id}"), ("GET", "/backups/detail")),
    _rule("backup:create", MEMBER, "Create backup.", ("POST", "/backups")),
    _rule("backup:get", READER, "Show backup.",
          ("GET", "/backups/{backup_id}"), ("GET", "/backups/{backup_id}/progress"),
          ("GET", "/backups/{backup_id}/verify"), ("POST", "/volumes (backup_id)")),
    _rule("backup:update", MEMBER, "Update backup.", ("PUT", "/backups/{backup_id}")),
    _rule("backup:delete", MEMBER, "Delete backup.", ("DELETE", "/backups/{backup_id}"),
          ("POST", "/backups/{backup_id}/action (os-force_delete)")),
    _rule("backup:restore", MEMBER, "Restore backup.",
          ("POST", "/backups/{backup_id}/restore")),
    _rule("backup:backup-import", ADMIN_API, "Import backup.",
          ("POST", "/backups/import_record")),
    _rule("backup:export-import", ADMIN_API, "Export backup.",
          ("GET", "/backups/{backup_id}/export_record")),
    _rule("volume_extension:backup_admin_actions:reset_status", ADMIN_API,
          "Reset status of a backup.",
          ("POST", "/backups/{backup_id}/action (os-reset_status)")),
    _rule("volume_extension:backup_admin_actions:force_delete", ADMIN_API,
          "Force delete a backup.",
          ("POST", "/backups/{backup_id}/action (os-force_delete)")),
    _rule("blockvault:backup:verify", MEMBER,
          "Check every block of a backup against its hash (blockvault extension).",
          ("POST", "/backups/{backup_id}/verify")),
    _rule("blockvault:container:verify", ADMIN_API,
          "Check every block every backup of a container references; a container holds "
          "several projects' backups (blockvault extension).",
          ("POST", "/os-container-verifications"),
          ("GET", "/os-container-verifications/{verification_id}")),
    # backup schedules (blockvault extension, docs/schedules.md): as the backups calls
    _rule("blockvault:backup_schedule:create", MEMBER,
          "Create a backup schedule (blockvault extension).", ("POST", "/os-backup-schedules")),
    _rule("blockvault:backup_schedule:get", READER,
          "Show a backup schedule (blockvault extension).",
          ("GET", "/os-backup-schedules/{schedule_id}")),
    _rule("blockvault:backup_schedule:get_all", READER,
          "List backup schedules (blockvault extension).", ("GET", "/os-backup-schedules")),
    _rule("blockvault:backup_schedule:update", MEMBER,
          "Update a backup schedule (blockvault extension).",
          ("PUT", "/os-backup-schedules/{schedule_id}")),
    _rule("blockvault:backup_schedule:delete", MEMBER,
          "Delete a backup schedule (blockvault extension).",
          ("DELETE", "/os-backup-schedules/{schedule_id}")),
    _rule("blockvault:backup:forget", MEMBER,
          "Preview or apply a keep-policy to a schedule's or a volume's backups; the "
          "deletes are also checked against backup:delete (blockvault extension).",
          ("POST", "/os-backup-forget")),
    # volumes (cinder/policies/volumes.py, volume_actions.py)
    _rule("volume:create", MEMBER, "Create volume.",
          ("POST", "/volumes"), ("POST", "/backups/{backup_id}/restore (no volume_id)")),
    _rule("volume:get", READER, "Show volume.", ("GET", "/volumes/{volume_id}"),
          ("GET", "/volumes/{volume_id}/metadata[/{key}] (every metadata call)"),
          ("POST", "/backups/{backup_id}/restore (volume_id)"),
          ("POST", "/volumes (source_volid)")),
    _rule("volume:get_all", READER, "List volumes or get summary of volumes.",
          ("GET", "/volumes"), ("GET", "/volumes/detail")),
    _rule("volume:update", MEMBER, "Update volume.", ("PUT", "/volumes/{volume_id}")),
    _rule("volume:delete", MEMBER, "Delete volume.", ("DELETE", "/volumes/{volume_id}")),
    _rule("volume:extend", MEMBER, "Extend a volume.",
          ("POST", "/volumes/{volume_id}/action (os-extend)")),
    _rule("volume_extension:volume_admin_actions:reset_status", ADMIN_API,
          "Reset status of a volume.",
          ("POST", "/volumes/{volume_id}/action (os-reset_status)")),
    _rule("volume_extension:volume_actions:attach", MEMBER, "Add attachment metadata.",
          ("POST", "/volumes/{volume_id}/action (os-attach)")),
    _rule("volume_extension:volume_actions:detach", MEMBER, "Clear attachment metadata.",
          ("POST", "/volumes/{volume_id}/action (os-detach)")),
    _rule("volume_extension:volume_actions:reserve", MEMBER, "Mark volume as reserved.",
          ("POST", "/volumes/{volume_id}/action (os-reserve)")),
    _rule("volume_extension:volume_actions:unreserve", MEMBER, "Unmark volume as reserved.",
          ("POST", "/volumes/{volume_id}/action (os-unreserve)")),
    _rule("volume_extension:volume_actions:begin_detaching", MEMBER, "Begin detach volumes.",
          ("POST", "/volumes/{volume_id}/action (os-begin_detaching)")),
    _rule("volume_extension:volume_actions:roll_detaching", MEMBER,
          "Roll back volume status to 'in-use'.",
          ("POST", "/volumes/{volume_id}/action (os-roll_detaching)")),
    _rule("volume_extension:volume_actions:initialize_connection", MEMBER,
          "Initialize volume attachment.",
          ("POST", "/volumes/{volume_id}/action (os-initialize_connection)")),
    _rule("volume_extension:volume_actions:terminate_connection", MEMBER,
          "Terminate volume attachment.",
          ("POST", "/volumes/{volume_id}/action (os-terminate_connection)")),
    # volume metadata (cinder/policies/volume_metadata.py)
    _rule("volume:get_volume_metadata", READER, "Show volume's metadata or one specified key.",
          ("GET", "/volumes/{volume_id}/metadata"),
          ("GET", "/volumes/{volume_id}/metadata/{key}"),
          ("DELETE", "/volumes/{volume_id}/metadata/{key}")),
    _rule("volume:create_volume_metadata", MEMBER, "Create volume metadata.",
          ("POST", "/volumes/{volume_id}/metadata")),
    _rule("volume:update_volume_metadata", MEMBER,
          "Replace a volume's metadata dictionary or update a single metadatum with a "
          "given key.",
          ("PUT", "/volumes/{volume_id}/metadata"),
          ("PUT", "/volumes/{volume_id}/metadata/{key}")),
    _rule("volume:delete_volume_metadata", MEMBER,
          "Delete a volume's metadatum with the given key.",
          ("DELETE", "/volumes/{volume_id}/metadata/{key}")),
    _rule("blockvault:volume:read_data", READER,
          "Read a volume's bytes (blockvault extension).",
          ("GET", "/volumes/{volume_id}/data")),
    _rule("blockvault:volume:write_data", MEMBER,
          "Write bytes into a volume (blockvault extension).",
          ("PUT", "/volumes/{volume_id}/data")),
    # snapshots (cinder/policies/snapshots.py)
    _rule("volume:get_snapshot", READER, "Show snapshot.",
          ("GET", "/snapshots/{snapshot_id}"), ("POST", "/volumes (snapshot_id)")),
    _rule("volume:get_all_snapshots", READER, "List snapshots.",
          ("GET", "/snapshots"), ("GET", "/snapshots/detail")),
    _rule("volume:create_snapshot", MEMBER, "Create snapshot.", ("POST", "/snapshots")),
    _rule("volume:update_snapshot", MEMBER, "Update snapshot.",
          ("PUT", "/snapshots/{snapshot_id}")),
    _rule("volume:delete_snapshot", MEMBER, "Delete snapshot.",
          ("DELETE", "/snapshots/{snapshot_id}")),
    # quotas and limits (cinder/policies/quotas.py, limits.py)
    _rule("volume_extension:quotas:show", READER,
          "Show project quota (including usage and default).",
          ("GET", "/os-quota-sets/{project_id}"),
          ("GET", "/os-quota-sets/{project_id}/defaults")),
    _rule("volume_extension:quotas:update", ADMIN_API, "Update project quota.",
          ("PUT", "/os-quota-sets/{project_id}")),
    _rule("limits_extension:used_limits", READER,
          "Show limits with used limit attributes.", ("GET", "/limits")),
    # services (cinder/policies/services.py)
    _rule("volume_extension:services:index", ADMIN_API,
          "List all services (the API and backup services per host, with their state).",
          ("GET", "/os-services")),
    # volume types (cinder/policies/volume_type.py)
    _rule("volume_extension:type_get", READER, "Get one specific volume type.",
          ("GET", "/types/{type_id}")),
    _rule("volume_extension:type_get_all", READER, "List volume types.", ("GET", "/types")),
    # volume backends: manage existing, pools (cinder/policies/manageable_volumes.py,
    # scheduler_stats.py)
    _rule("volume_extension:volume_manage", ADMIN_API, "Manage existing volumes.",
          ("POST", "/manageable_volumes"), ("POST", "/os-volume-manage")),
    _rule("volume_extension:volume_unmanage", ADMIN_API,
          "Stop managing a volume.", ("POST", "/volumes/{volume_id}/action (os-unmanage)")),
    _rule("volume_extension:list_manageable", ADMIN_API,
          "List (in detail) of volumes which are available to manage.",
          ("GET", "/manageable_volumes"), ("GET", "/manageable_volumes/detail")),
    _rule("scheduler_extension:scheduler_stats:get_pools", ADMIN_API,
          "List all backend pools.", ("GET", "/scheduler-stats/get_pools")),
    # the web dashboard (blockvault extension, blockvault.dashboard): read-only pages
    _rule("blockvault:dashboard:view", READER,
          "View a project's dashboard: backups, running jobs, schedules, storage, verify "
          "results (blockvault extension).",
          ("GET", "/dashboard"), ("GET", "/dashboard/api/jobs")),
    _rule("blockvault:dashboard:all_projects", ADMIN_API,
          "View the dashboard of every project at once (blockvault extension).",
          ("GET", "/dashboard?project=*"), ("GET", "/dashboard/api/jobs?project=*")),
]

RULE_NAMES = frozenset(r.name for r in API_RULES)


def _target(ctx: Any, resource: Any) -> dict[str, Any]:
    """What Cinder passes as the target: the resource's project and user, or for lists and
    creates the caller's own (the URL's project)."""
    if resource is None:
        return {"project_id": ctx.project_id, "user_id": ctx.user_id}
    if isinstance(resource, dict):
        return dict(resource)
    return {"project_id": getattr(resource, "project_id", None),
            "user_id": getattr(resource, "user_id", None)}


def _credentials(user_id: str, project_id: str, roles: Iterable[str],
                 is_admin: bool) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "project_id": project_id,
        "roles": sorted(roles),
        "is_admin": is_admin,
        # Keystone's default when no admin project is configured, as keystonemiddleware
        # reports it (X-Is-Admin-Project: True)
        "is_admin_project": True,
        "system_scope": None,
        "domain_id": None,
    }


#: decisions remembered (rule, target, credentials); past it the memory starts again
MAX_DECISIONS = 4096


def _frozen(values: dict[str, Any]) -> tuple | None:
    """A hashable copy of a target or credentials dict, or None if a value has no such copy."""
    try:
        items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                             for k, v in values.items()))
        hash(items)
    except TypeError:
        return None
    return items


class Policy:
    """One oslo.policy ``Enforcer`` with blockvault's rules registered. The policy file is
    re-read by oslo.policy on the first check after its modification time changes; a file
    that is absent means the defaults (and if it is deleted, the defaults again).

    Decisions are remembered until the file changes (its mtime, size or inode): a decision
    depends only on the rules, the target and the credentials (blockvault's rules and
    Cinder's use no checks that ask elsewhere), and oslo.policy's evaluation costs ~0.1 ms of
    Python per rule (``inspect.getfullargspec`` on every check of the rule's tree), twice
    per show request."""

    def __init__(self, policy_file: str | Path | None = None) -> None:
        self.policy_file = str(Path(policy_file).expanduser().resolve()) if policy_file else None
        self.enforcer = self._new_enforcer()
        # A reload replaces the rules and then refills the defaults; a check running in
        # another thread at that moment must not see the half-built set.
        self._lock = threading.Lock()
        self._decisions: dict[tuple, bool] = {}
        #: the policy file's (mtime, size, inode) the decisions were made under
        self._stamp: tuple | None = self._file_stamp()

    def _file_stamp(self) -> tuple | None:
        if self.policy_file is None:
            return None
        try:
            st = os.stat(self.policy_file)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _new_enforcer(self) -> oslo_policy.Enforcer:
        conf = cfg.ConfigOpts()
        conf(args=[], project="blockvault", default_config_files=[], default_config_dirs=[])
        path = self.policy_file
        enforcer = oslo_policy.Enforcer(conf, policy_file=path, use_conf=path is not None)
        # No policy.d search in the usual /etc places: only the file the operator named.
        conf.set_override("policy_dirs", [], "oslo_policy")
        enforcer.register_defaults(BASE_RULES)
        enforcer.register_defaults(API_RULES)
        if path is None:
            # Without a file oslo.policy never loads anything, defaults included.
            enforcer.set_rules(
                oslo_policy.Rules({r.name: r.check for r in BASE_RULES + API_RULES}),
                use_conf=False,
            )
        return enforcer

    def _enforce(self, rule: str, target: dict[str, Any], creds: dict[str, Any]) -> bool:
        frozen_target, frozen_creds = _frozen(target), _frozen(creds)
        key = (rule, frozen_target, frozen_creds)
        remember = frozen_target is not None and frozen_creds is not None
        stamp = self._file_stamp()
        # A known decision under an unchanged file is read without the lock (a dict lookup
        # is atomic): the lock serialized every request's checks.
        if remember and stamp == self._stamp and (known := self._decisions.get(key)) is not None:
            return known
        with self._lock:
            if stamp != self._stamp:
                self._decisions.clear()
                self._stamp = stamp
            decision = self._decide(rule, target, creds)
            if remember:
                if len(self._decisions) >= MAX_DECISIONS:
                    self._decisions.clear()
                self._decisions[key] = decision
            return decision

    def _decide(self, rule: str, target: dict[str, Any], creds: dict[str, Any]) -> bool:
        """oslo.policy's answer (under the lock)."""
        path = self.enforcer.policy_path
        if path and not os.path.exists(path):
            # The file was removed: start again from the defaults (oslo.policy would
            # keep its last rules and log an error at every check).
            log.info("policy file %s removed: the default rules apply", path)
            self.enforcer = self._new_enforcer()
        try:
            return bool(self.enforcer.authorize(rule, target, creds, do_raise=False))
        except oslo_policy.PolicyNotRegistered:
            raise
        except Exception as exc:
            # A file that does not parse is not loaded (oslo.policy has noted its
            # mtime, so it is not tried again until it changes): the rules in force
            # before it stay, and the operator reads why in the log.
            log.error("policy file %s not loaded, the previous rules stay in force: %s",
                      self.policy_file, exc)
            return bool(self.enforcer.authorize(rule, target, creds, do_raise=False))

    def check(self, rule: str, target: dict[str, Any], creds: dict[str, Any]) -> bool:
        return self._enforce(rule, target, creds)

    def is_admin(self, user_id: str, project_id: str, roles: Iterable[str]) -> bool:
        """Cinder's ``check_is_admin``: the ``context_is_admin`` rule on the caller's roles."""
        creds = _credentials(user_id, project_id, roles, False)
        return self._enforce("context_is_admin", creds, creds)

    def allowed(self, ctx: Any, rule: str, resource: Any = None) -> bool:
        if rule not in RULE_NAMES:  # a typo must fail loudly, never allow or deny quietly
            raise KeyError(f"policy rule {rule} is not registered")
        creds = _credentials(ctx.user_id, ctx.project_id, ctx.roles, ctx.is_admin)
        return self.check(rule, _target(ctx, resource), creds)

    def authorize(self, ctx: Any, rule: str, resource: Any = None) -> None:
        """Raise Forbidden (403, Cinder's words) unless ``ctx`` may do ``rule`` on
        ``resource`` (an object or dict with ``project_id``/``user_id``; None: the caller's
        own project)."""
        if not self.allowed(ctx, rule, resource):
            raise Forbidden(f"Policy doesn't allow {rule} to be performed.")


_current = Policy()
_current_lock = threading.Lock()


def configure(policy_file: str | Path | None) -> Policy:
    """Use ``policy_file`` (absent: the defaults) for every check from now on."""
    global _current
    with _current_lock:
        if _current.policy_file != (str(Path(policy_file).expanduser().resolve())
                                    if policy_file else None):
            _current = Policy(policy_file)
        return _current


def current() -> Policy:
    return _current


def authorize(ctx: Any, rule: str, resource: Any = None) -> None:
    _current.authorize(ctx, rule, resource)


def allowed(ctx: Any, rule: str, resource: Any = None) -> bool:
    return _current.allowed(ctx, rule, resource)


def sample_yaml() -> str:
    """The defaults as ``oslopolicy-sample-generator --format yaml`` writes them: each rule
    commented out under its description and operations, ready to copy into a policy.yaml
    and uncomment."""
    out: list[str] = []
    for rule in BASE_RULES + API_RULES:
        for line in textwrap.wrap(rule.description or "", 76):
            out.append(f"# {line}")
        for op in getattr(rule, "operations", None) or []:
            out.append(f"# {op['method']}  {op['path']}")
        out.append(f'#"{rule.name}": "{rule.check_str}"')
        out.append("")
    return "\n".join(out)
