"""Who is calling: the identity the API resolved from the request."""

from __future__ import annotations

from dataclasses import dataclass

from blockvault.service.errors import Forbidden


@dataclass(frozen=True)
class RequestContext:
    user_id: str
    project_id: str
    is_admin: bool = False

    def require_admin(self, policy: str) -> None:
        if not self.is_admin:
            raise Forbidden(f"Policy doesn't allow {policy} to be performed.")
