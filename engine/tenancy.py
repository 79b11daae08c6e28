"""Who is asking: the tenant whose deployments a request sees.

Every deployment belongs to the tenant that created it (the registry stores it). A caller sees, uses, updates and
deletes only its own tenant's deployments; another tenant's id is exactly an unknown id (400 ``Key not found``). An
admin sees every tenant's. The API edge (api/auth.py) turns an API key into a :class:`Tenant`; a server without keys
has one caller, :data:`OPEN`, which is today's behaviour: one tenant that sees everything.

Embedding vectors are not tenant data: they are a function of the (public) model and the text, shared by everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache.registry import DEFAULT_TENANT


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False

    @property
    def view(self) -> str | None:
        """The tenant filter of the registry's reads: this tenant's name, or None (every tenant) for an admin."""
        return None if self.admin else self.name


# The caller of a server without API keys: deployments go to the default tenant, and every deployment is visible.
OPEN = Tenant(DEFAULT_TENANT, admin=True)
