"""The in-memory view of keys and models that the request path reads.

The request path never queries the database: it reads two dicts. A background task
polls the store's config version every ``refresh_interval`` seconds (one tiny query, in
a thread) and swaps in a fresh snapshot when it changed, so a key revoked or a model
added with the CLI takes effect within that interval on every gateway process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .auth import EXPIRED, Principal, authenticate
from .background import StoreThread
from .errors import AuthenticationFailed, ModelNotFound
from .store import KeyRecord, ModelRecord, Snapshot, Store

__all__ = ["Registry", "Route"]

log = logging.getLogger("paragate.registry")

_MAX_CHECKED = 10_000


@dataclass(frozen=True, slots=True)
class Route:
    """Where a model's requests go, and the limits that apply to them."""

    name: str
    upstream_url: str  # vLLM base, e.g. http://host:8000/v1
    upstream_model: str
    upstream_api_key: str | None
    max_logprobs: int
    default_max_tokens: int | None
    max_tokens_limit: int | None
    display_name: str
    type: str
    created: int

    @property
    def completions_url(self) -> str:
        return self.upstream_url.rstrip("/") + "/completions"


class Registry:
    """Keys by public id and enabled models by name, from the newest snapshot."""

    def __init__(self, store: Store, thread: StoreThread, *, default_max_logprobs: int,
                 refresh_interval: float) -> None:
        self._store = store
        self._thread = thread
        self._default_max_logprobs = default_max_logprobs
        self._interval = refresh_interval
        self.version = -1
        self.keys: dict[str, KeyRecord] = {}
        self.routes: dict[str, Route] = {}
        # Authorization header -> principal, for keys already checked against this
        # snapshot: a known key costs one dict lookup instead of a hash. Emptied with
        # every new snapshot, so a revoked key is refused as soon as the change loads.
        self._checked: dict[bytes, Principal] = {}

    def load(self, snapshot: Snapshot) -> None:
        self._checked = {}
        self.keys = {k.public_id: k for k in snapshot.keys}
        self.routes = {m.name: self._route(m) for m in snapshot.models if m.enabled}
        self.version = snapshot.version

    def _route(self, m: ModelRecord) -> Route:
        created = m.created_at.timestamp() if m.created_at else 0
        return Route(
            name=m.name,
            upstream_url=m.upstream_url,
            upstream_model=m.upstream_model,
            upstream_api_key=m.upstream_api_key,
            max_logprobs=m.max_logprobs
            if m.max_logprobs is not None
            else self._default_max_logprobs,
            default_max_tokens=m.default_max_tokens,
            max_tokens_limit=m.max_tokens_limit,
            display_name=m.display_name or m.name,
            type=m.type,
            created=int(created),
        )

    def authenticate(self, authorization: bytes | None) -> Principal:
        """The principal of a valid ``Authorization`` header, else 401."""
        if authorization is not None:
            who = self._checked.get(authorization)
            if who is not None:
                if who.expires_at is not None and time.time() >= who.expires_at:
                    raise AuthenticationFailed(EXPIRED)
                return who
        who = authenticate(authorization, self.keys)
        if len(self._checked) >= _MAX_CHECKED:
            self._checked = {}
        self._checked[authorization or b""] = who
        return who

    def resolve(self, principal: Principal, model: str) -> Route:
        """The route of a model this principal may use, else 404 ``model_not_found``."""
        route = self.routes.get(model)
        if route is None or not principal.may_use(model):
            raise ModelNotFound(model)
        return route

    def visible_to(self, principal: Principal) -> list[Route]:
        return [r for name, r in sorted(self.routes.items()) if principal.may_use(name)]

    async def refresh(self) -> bool:
        """Reload if the store's version moved; True when a new snapshot was loaded."""
        version = await self._thread.run(self._store.version)
        if version == self.version:
            return False
        self.load(await self._thread.run(self._store.snapshot))
        log.info("loaded config version %d: %d keys, %d enabled models",
                 self.version, len(self.keys), len(self.routes))
        return True

    async def run(self) -> None:
        """Poll forever; a failing store is logged and retried, the last view kept."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:  # the store may be briefly down; keep serving
                log.exception("refreshing keys and models failed; keeping version %d",
                              self.version)
