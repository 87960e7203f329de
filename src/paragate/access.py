"""Roles and permissions, and the one check that applies them.

Every route names a ``Permission`` (or is public, with a reason: ``app.PUBLIC_PATHS``);
``require`` runs once per request, in ``app``, after authentication and before the
handler reads or validates anything. It answers the question "may this role ever do
this kind of thing?" (403 when not). Which objects a caller may see or touch (their own
company, their own keys) is the scope, decided below it in ``control`` and answered 404,
so that nobody learns another company's object exists.

The order of answers is therefore fixed: 401 (no valid key), 403 (the role may never),
404 (an object in the path outside the scope), 400 (the body), 404 (an object the body
names, outside the scope), 403 (a role above the caller's own), 409 (a conflict).
"""

from __future__ import annotations

from dataclasses import dataclass

from .auth import Principal
from .errors import PermissionDenied

__all__ = [
    "ADMIN",
    "COMPANY_ADMIN",
    "PERMISSIONS",
    "RANK",
    "ROLES",
    "USER",
    "Permission",
    "require",
]

ADMIN, COMPANY_ADMIN, USER = "admin", "company_admin", "user"
ROLES = (USER, COMPANY_ADMIN, ADMIN)
RANK = {role: i for i, role in enumerate(ROLES)}  # nobody grants above their own


@dataclass(frozen=True, slots=True)
class Permission:
    """A kind of action, and the roles that may take it. ``key_manager``: a plain user
    may take it only with the ``key_manager`` permission."""

    name: str
    roles: frozenset[str]
    key_manager: bool = False
    description: str = ""


def _p(name: str, roles: tuple[str, ...], description: str, *,
       key_manager: bool = False) -> Permission:
    return Permission(name, frozenset(roles), key_manager, description)


_ANYONE = (USER, COMPANY_ADMIN, ADMIN)
_ADMINS = (COMPANY_ADMIN, ADMIN)

PERMISSIONS = {p.name: p for p in (
    _p("inference", _ANYONE, "use the models the key may use"),
    _p("me", _ANYONE, "read one's own key, user and company"),
    _p("companies.read", _ADMINS, "read companies (company admins: their own)"),
    _p("companies.create", (ADMIN,), "create companies"),
    _p("companies.update", _ADMINS, "rename companies (company admins: their own)"),
    _p("companies.delete", (ADMIN,), "delete companies"),
    _p("users.read", _ADMINS, "read users (company admins: their company's)"),
    _p("users.write", _ADMINS, "create, change and delete users (company admins: their "
       "company's, never above their own role)"),
    _p("keys.read", _ANYONE, "read keys (users: their own; company admins: their "
       "company's)"),
    _p("keys.revoke", _ANYONE, "revoke keys (in the same scope as reading them, never "
       "those of a role above the caller's)"),
    _p("keys.manage", _ANYONE, "create, change and rotate keys (plain users: their own, "
       "with key_manager)", key_manager=True),
    _p("models.manage", (ADMIN,), "create, change and delete models; see every model"),
    _p("audit.read", _ADMINS, "read the audit log (company admins: their company's)"),
    _p("metrics.read", (ADMIN,), "read the Prometheus metrics (or with "
       "PARAGATE_METRICS_TOKEN)"),
    _p("usage.report", _ANYONE, "read usage reports (users: their own keys; company "
       "admins: their company's)"),
)}


def require(who: Principal, permission: Permission) -> None:
    """403 unless ``who``'s role may take this kind of action."""
    role = who.role
    if role in permission.roles and (
        not permission.key_manager or role != USER or who.key_manager
    ):
        return
    if permission.key_manager and role == USER:
        raise PermissionDenied("Only users with the key_manager permission may do this.")
    raise PermissionDenied(f"The role '{role}' may not {permission.description}.")
