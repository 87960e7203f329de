"""The control plane's route table: companies, users, API keys, model configuration,
the audit log, usage reports and ``/me``. Every route names its permission (``access.PERMISSIONS``);
``app`` checks it before a handler runs. Nothing here is on the completions path."""

from __future__ import annotations

from ..access import PERMISSIONS
from ..routing import Endpoint, Handler, Table
from . import audit, companies, keys, models, replicas, reporting, users

__all__ = ["ROUTES"]


def _e(handler: Handler, permission: str) -> Endpoint:
    return Endpoint(handler, PERMISSIONS[permission])


ROUTES: Table = {
    "/api/v2/me": {"GET": _e(audit.me, "me")},
    "/api/v2/companies": {"GET": _e(companies.list_, "companies.read"),
                          "POST": _e(companies.create, "companies.create")},
    "/api/v2/companies/{id}": {"GET": _e(companies.retrieve, "companies.read"),
                               "PATCH": _e(companies.update, "companies.update"),
                               "DELETE": _e(companies.delete, "companies.delete")},
    "/api/v2/users": {"GET": _e(users.list_, "users.read"),
                      "POST": _e(users.create, "users.write")},
    "/api/v2/users/{id}": {"GET": _e(users.retrieve, "users.read"),
                           "PATCH": _e(users.update, "users.write"),
                           "DELETE": _e(users.delete, "users.write")},
    "/api/v2/api-keys": {"GET": _e(keys.list_, "keys.read"),
                         "POST": _e(keys.create, "keys.manage")},
    "/api/v2/api-keys/{id}": {"GET": _e(keys.retrieve, "keys.read"),
                              "PATCH": _e(keys.update, "keys.manage"),
                              "DELETE": _e(keys.revoke, "keys.revoke")},
    "/api/v2/api-keys/{id}/rotate": {"POST": _e(keys.rotate, "keys.manage")},
    "/api/v2/models": {"POST": _e(models.create, "models.manage")},
    "/api/v2/models/{model}": {"PATCH": _e(models.update, "models.manage"),
                               "DELETE": _e(models.delete, "models.manage")},
    "/api/v2/models/{model}/replicas": {"GET": _e(replicas.list_, "models.manage"),
                                        "POST": _e(replicas.create, "models.manage")},
    "/api/v2/models/{model}/replicas/{replica}": {
        "PATCH": _e(replicas.update, "models.manage"),
        "DELETE": _e(replicas.delete, "models.manage")},
    "/api/v2/audit-log": {"GET": _e(audit.list_, "audit.read")},
    "/api/v2/reporting/usage": {"GET": _e(reporting.usage_report, "usage.report")},
}
