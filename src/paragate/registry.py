"""The in-memory view of the control plane that the request path reads.

The request path never queries the database: it reads dicts. Companies, users and keys
(revoked and expired ones too, so that the 401 can say why) and the live models are
held here, and changed row by row as the store's changes arrive (``refresher.py``). A key
already checked against the current view is recognised by its header in one dict lookup;
that cache is emptied whenever a change is applied, so a revocation, a deleted user or a
changed permission holds from the next request on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from .auth import REVOKED, Principal, check_key
from .config import Settings
from .errors import AuthenticationFailed, ModelNotFound, ViewTooOld
from .limits.spec import Limit, limits_of
from .store import Changes, CompanyRecord, KeyRecord, ModelRecord, ReplicaRecord, UserRecord
from .upstream.pool import Timeouts

__all__ = ["Registry", "Route", "View"]

_MAX_CHECKED = 10_000


@dataclass(frozen=True, slots=True)
class Route:
    """A live model: where its requests go, who may use it, the limits that apply."""

    id: int
    name: str
    upstream_url: str  # its first replica's vLLM base, e.g. http://host:8000/v1 (shown)
    upstream_model: str
    upstream_api_key: str | None  # as stored (encrypted): views say only if one is set
    enabled: bool
    company_ids: frozenset[int] | None  # None: every company
    max_logprobs: int
    max_logprobs_set: int | None  # as configured (None: the default applies)
    default_max_tokens: int | None
    max_tokens_limit: int | None
    display_name: str
    type: str
    created: int
    # the model's live replicas, enabled or not, by id (a new tuple whenever one changes)
    replicas: tuple[ReplicaRecord, ...] = ()
    timeouts: Timeouts | None = None  # its own where set, else the gateway's
    timeouts_set: tuple[float | None, ...] = (None, None, None, None)  # as configured
    affinity: str = "none"  # none | prefix | user
    limits: tuple[Limit, ...] = ()  # for all its callers together
    limits_set: dict[str, int] | None = None  # as configured
    max_prompts: int = 64  # the caps on one request (the model's, else the defaults)
    max_n: int = 16
    max_request_tokens: int = 1_000_000
    caps_set: tuple[int | None, ...] = (None, None, None)  # as configured
    log_payloads: bool = False  # its requests' prompts and completions go to the log

    def open_to(self, company_id: int) -> bool:
        return self.company_ids is None or company_id in self.company_ids


# What ``Registry.resolve`` finds for a name no route has: a route open to no company.
_NOWHERE = Route(id=-1, name="", upstream_url="", upstream_model="", upstream_api_key=None,
                 enabled=False, company_ids=frozenset(), max_logprobs=0,
                 max_logprobs_set=None, default_max_tokens=None, max_tokens_limit=None,
                 display_name="", type="", created=0)


@dataclass(slots=True)
class View:
    """The dicts of one version of the control plane."""

    version: int
    companies: dict[int, CompanyRecord]
    users: dict[int, UserRecord]
    keys: dict[str, KeyRecord]
    catalog: dict[int, Route]  # live models by id, enabled or not
    replicas: dict[int, ReplicaRecord]  # live replicas by id


class Registry:
    """The current view, and the questions the request path asks of it."""

    def __init__(self, *, default_max_logprobs: int, max_view_age: float = 0.0,
                 default_timeouts: Timeouts | None = None,
                 default_caps: tuple[int, int, int] | None = None) -> None:
        self._default_max_logprobs = default_max_logprobs
        defaults = Settings()
        self._default_caps = default_caps or (defaults.max_prompts, defaults.max_n,
                                              defaults.max_request_tokens)
        self._default_timeouts = default_timeouts or Timeouts(
            defaults.upstream_connect_timeout, defaults.upstream_read_timeout,
            defaults.upstream_read_timeout)
        self._max_age = max_view_age
        self.version = 0
        self.companies: dict[int, CompanyRecord] = {}
        self.users: dict[int, UserRecord] = {}
        self.keys: dict[str, KeyRecord] = {}
        self.catalog: dict[int, Route] = {}
        self.replicas: dict[int, ReplicaRecord] = {}
        self.routes: dict[str, Route] = {}  # enabled live models by name
        # Authorization header -> principal, for keys already checked against this view.
        self._checked: dict[bytes, Principal] = {}
        self.used: set[int] = set()  # ids of keys used since the last write of last_used_at
        self.fresh_at = time.monotonic()  # when the store last answered the refresher
        self.loaded = False  # a whole view has been installed

    # -- applying changes -------------------------------------------------------------------

    def build(self, changes: Changes) -> View:
        """A whole new view from every row (``Store.changes(0)``); runs in a thread."""
        view = View(changes.version, {}, {}, {}, {}, {})
        self._apply_rows(view, changes)
        return view

    def install(self, view: View) -> None:
        """Swap in a whole view at once."""
        self.companies, self.users, self.keys = view.companies, view.users, view.keys
        self.catalog, self.replicas = view.catalog, view.replicas
        self.routes = {r.name: r for r in view.catalog.values() if r.enabled}
        self._checked = {}
        self.version = view.version
        self.loaded = True

    def apply(self, changes: Changes) -> None:
        """Apply some changed rows in place (a slice of them: see ``slices``)."""
        view = View(self.version, self.companies, self.users, self.keys, self.catalog,
                    self.replicas)
        renamed = self._apply_rows(view, changes)
        for model_id in renamed:
            old = next((n for n, r in self.routes.items() if r.id == model_id), None)
            if old is not None:
                del self.routes[old]
            route = self.catalog.get(model_id)
            if route is not None and route.enabled:
                self.routes[route.name] = route
        self._checked = {}
        self.version = max(self.version, changes.version)

    def _apply_rows(self, view: View, changes: Changes) -> list[int]:
        for c in changes.companies:
            if c.deleted_at is None:
                view.companies[c.id] = c
            else:
                view.companies.pop(c.id, None)
        for u in changes.users:
            if u.deleted_at is None:
                view.users[u.id] = u
            else:
                view.users.pop(u.id, None)
        for k in changes.keys:
            view.keys[k.public_id] = k
        for r in changes.replicas:
            if r.deleted_at is None:
                view.replicas[r.id] = r
            else:
                view.replicas.pop(r.id, None)
        for m in changes.models:
            if m.deleted_at is None:
                view.catalog[m.id] = self._route(m)
            else:
                view.catalog.pop(m.id, None)
        changed = {m.id for m in changes.models} | {r.model_id for r in changes.replicas}
        if changes.replicas or changes.models:
            by_model: dict[int, list[ReplicaRecord]] = {i: [] for i in changed}
            for r in view.replicas.values():
                if r.model_id in by_model:
                    by_model[r.model_id].append(r)
            for model_id, found in by_model.items():
                route = view.catalog.get(model_id)
                if route is not None:
                    view.catalog[model_id] = replace(
                        route, replicas=tuple(sorted(found, key=lambda r: r.id)))
        return sorted(changed)

    def _route(self, m: ModelRecord) -> Route:
        created = m.created_at.timestamp() if m.created_at else 0
        return Route(
            id=m.id,
            name=m.name,
            upstream_url=m.upstream_url,
            upstream_model=m.upstream_model,
            upstream_api_key=m.upstream_api_key,
            enabled=m.enabled,
            company_ids=frozenset(m.company_ids) if m.company_ids is not None else None,
            max_logprobs=m.max_logprobs
            if m.max_logprobs is not None
            else self._default_max_logprobs,
            max_logprobs_set=m.max_logprobs,
            default_max_tokens=m.default_max_tokens,
            max_tokens_limit=m.max_tokens_limit,
            display_name=m.display_name or m.name,
            type=m.type,
            created=int(created),
            timeouts=self._timeouts(m),
            timeouts_set=(m.connect_timeout, m.first_byte_timeout, m.idle_timeout,
                          m.total_timeout),
            affinity=m.affinity,
            limits=limits_of("m", m.id, m.rate_limits),
            limits_set=m.rate_limits,
            max_prompts=m.max_prompts or self._default_caps[0],
            max_n=m.max_n or self._default_caps[1],
            max_request_tokens=m.max_request_tokens or self._default_caps[2],
            caps_set=(m.max_prompts, m.max_n, m.max_request_tokens),
            log_payloads=m.log_payloads,
        )

    def _timeouts(self, m: ModelRecord) -> Timeouts:
        d = self._default_timeouts
        return Timeouts(
            connect=m.connect_timeout if m.connect_timeout is not None else d.connect,
            first_byte=m.first_byte_timeout if m.first_byte_timeout is not None
            else d.first_byte,
            idle=m.idle_timeout if m.idle_timeout is not None else d.idle,
            total=m.total_timeout if m.total_timeout is not None else d.total)

    # -- the request path -------------------------------------------------------------------

    def authenticate(self, authorization: bytes | None) -> Principal:
        """The principal of a valid ``Authorization`` header, else 401 (or 503 when the
        view is older than ``PARAGATE_MAX_VIEW_AGE``)."""
        if self._max_age and self.too_old():  # no call at all without a bound
            raise ViewTooOld(
                "The gateway has lost its connection to the store for longer than "
                f"{self._max_age:g} s and no longer trusts its view of keys and models.")
        if authorization is not None:
            who = self._checked.get(authorization)
            if who is not None and (who.expires_at is None or time.time() < who.expires_at):
                self.used.add(who.key_id)
                return who
        record, until = check_key(authorization, self.keys)
        user = self.users.get(record.user_id)
        company = self.companies.get(user.company_id) if user is not None else None
        if user is None or company is None:  # deleted: its keys are revoked too
            raise AuthenticationFailed(REVOKED)
        who = Principal(
            key_id=record.id,
            public_id=record.public_id,
            name=record.name,
            user_id=user.id,
            company_id=company.id,
            role=user.role,
            key_manager=user.key_manager,
            model_ids=frozenset(record.model_ids) if record.model_ids is not None else None,
            expires_at=until,
            usage_opt_in=record.usage_opt_in,
            limits=(limits_of("k", record.id, record.rate_limits)
                    + limits_of("u", user.id, user.rate_limits)
                    + limits_of("c", company.id, company.rate_limits)),
            allow_priority=company.allow_priority,
        )
        if len(self._checked) >= _MAX_CHECKED:
            self._checked = {}
        self._checked[authorization or b""] = who
        self.used.add(who.key_id)
        return who

    def resolve(self, who: Principal, model: str) -> Route:
        """The route of a model this principal may use, else 404 ``model_not_found``:
        unknown, disabled, not enabled for the company and not among the key's models
        all look the same."""
        # One path for all of them, so that neither the answer nor the work done tells
        # a name nobody configured from another company's model: an unknown name is
        # looked up as a route open to nobody, through the same checks (``&``, not a
        # short-circuit), and refused by the same raise (bench/isolation.py counts the
        # calls each makes).
        route = self.routes.get(model, _NOWHERE)
        company_ids, model_ids = route.company_ids, who.model_ids
        if not ((route is not _NOWHERE)
                & (company_ids is None or who.company_id in company_ids)
                & (model_ids is None or route.id in model_ids)):
            raise ModelNotFound(model)
        return route

    def usable(self, who: Principal) -> list[Route]:
        """The models this principal may use, by name."""
        return [r for _, r in sorted(self.routes.items()) if r.open_to(who.company_id) and (
            who.model_ids is None or r.id in who.model_ids)]

    def logging_payloads(self) -> tuple[str, ...]:
        """The names of the enabled models whose prompts and completions are written to
        the log (``log_payloads``), sorted; a disabled model serves nothing to log."""
        return tuple(sorted(r.name for r in self.routes.values() if r.log_payloads))

    def model_names(self, ids: frozenset[int] | tuple[int, ...] | None) -> list[str] | None:
        if ids is None:
            return None
        return sorted(self.catalog[i].name for i in ids if i in self.catalog)

    def age(self) -> float:
        """Seconds since the store last answered."""
        return time.monotonic() - self.fresh_at

    @property
    def max_view_age(self) -> float:
        """``PARAGATE_MAX_VIEW_AGE``: 0 for no bound."""
        return self._max_age

    def too_old(self) -> bool:
        """Whether the view is older than ``PARAGATE_MAX_VIEW_AGE`` (when set): every
        request with a key is then refused (``authenticate``), and ``/ready`` says
        ``stale``; the one condition for both."""
        return bool(self._max_age) and time.monotonic() - self.fresh_at > self._max_age

    def take_used(self) -> set[int]:
        used, self.used = self.used, set()
        return used


def slices(changes: Changes, size: int = 2000) -> Iterator[Changes]:
    """``changes`` cut into pieces of at most ``size`` rows, in order, so that applying a
    large change (a company of 50,000 keys deleted) never holds the event loop for long.
    Only the last piece carries the new version."""
    groups = [("companies", changes.companies), ("users", changes.users),
              ("keys", changes.keys), ("replicas", changes.replicas),
              ("models", changes.models)]  # a new model's replicas are there first
    pieces: list[Changes] = []
    for name, rows in groups:
        for start in range(0, len(rows), size):
            pieces.append(Changes(since=changes.since, version=changes.since,
                                  **{name: rows[start:start + size]}))  # type: ignore[arg-type]
    if not pieces:
        yield changes
        return
    *head, last = pieces
    yield from head
    yield Changes(since=changes.since, version=changes.version, companies=last.companies,
                  users=last.users, keys=last.keys, models=last.models,
                  replicas=last.replicas)
