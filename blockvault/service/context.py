"""Who is calling: the identity the API resolved from the request (by whichever
``auth_strategy`` is configured), and the roles that policy decides on."""

from __future__ import annotations

from dataclasses import dataclass, field

from blockvault.service.errors import Forbidden

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
    #: the caller's roles, implied ones included (``admin`` implies member and reader)
    roles: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_identity(cls, user_id: str, project_id: str, roles: object) -> RequestContext:
        """The context of an authenticated caller: admin is Cinder's ``context_is_admin``
        (the ``admin`` role)."""
        all_roles = with_implied(roles)
        return cls(user_id=user_id, project_id=project_id, is_admin="admin" in all_roles,
                   roles=all_roles)

    def require_admin(self, policy: str) -> None:
        if not self.is_admin:
            raise Forbidden(f"Policy doesn't allow {policy} to be performed.")
