"""The control plane's operations, shared by the admin API and the CLI.

Each operation validates its input, checks the caller's scope, makes the change and
writes its audit row, all in one transaction (``Store.change``), so the API and the CLI
cannot disagree and no change exists without its audit row. Nothing here knows HTTP:
errors are raised as the ``errors`` classes, which both callers render.

Scope (what a caller may see and touch) is decided here; whether a role may take a kind
of action at all is ``access.require``, checked earlier by the API. Operations repeat
the role check for the CLI's sake only where it is cheap; the CLI acts as a system
admin.
"""

from __future__ import annotations

from . import audit, companies, keys, models, replicas, secrets, usage, users
from .common import Actor, Page

__all__ = ["Actor", "Page", "audit", "companies", "keys", "models", "replicas", "secrets",
           "usage", "users"]
