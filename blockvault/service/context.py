"""Who is calling: the identity the API resolved from the request (by whichever
``auth_strategy`` is configured), and the roles that policy decides on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blockvault.service import policy

#: Keystone's implied roles: a token normally lists them already, but one made by hand
#: (an API key, noauth) names only the top role it was given.
IMPLIED_ROLES = {"admin": ("member", "reader"), "member": ("reader",)}


def with_implied(roles: object) -> frozenset[str]:
    """``roles`` plus every role they imply, lower-cased as Keystone compares them."""
    out: set[str] = set()
    for role in roles:  # type: ignore[attr-defined]
        role = str(role).strip().lower()
        if role:
            out.add(role)
            out.update(IMPLIED_ROLES.get(role, ()))
    return frozenset(out)


@dataclass(frozen=True)
class RequestContext:
    user_id: str
    project_id: str
    is_admin: bool = False
    #: the caller's roles, implied ones included (``admin`` implies member and reader).
    #: None (a context made in code, not from a request): a member of the project, or an
    #: admin when ``is_admin``.
    roles: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.roles is None:
            object.__setattr__(self, "roles", with_implied(["admin" if self.is_admin
                                                            else "member"]))

    @classmethod
    def from_identity(cls, user_id: str, project_id: str, roles: object) -> RequestContext:
        """The context of an authenticated caller. ``is_admin`` is Cinder's: the
        ``context_is_admin`` policy rule (``role:admin`` unless the policy file says
        otherwise) on the caller's roles."""
        all_roles = with_implied(roles)
        return cls(user_id=user_id, project_id=project_id,
                   is_admin=policy.current().is_admin(user_id, project_id, all_roles),
                   roles=all_roles)

    def authorize(self, rule: str, resource: Any = None) -> None:
        """403 (Forbidden) unless policy ``rule`` allows this caller on ``resource`` (its
        ``project_id``/``user_id``), or on its own project when there is none."""
        policy.authorize(self, rule, resource)

    def allowed(self, rule: str, resource: Any = None) -> bool:
        return policy.allowed(self, rule, resource)
