"""Who may do what: one table of (caller, endpoint, object in the path) and the answer
each must get, through the ASGI app, on SQLite and PostgreSQL.

The rules are ``access.py``'s, in its order: 401 without a valid key, whatever the
endpoint; 403 when the caller's role may never take that kind of action; 404 for an
object in the path outside the caller's scope, shaped exactly like the 404 for one that
does not exist; then the body (400); then 2xx. ``ENDPOINTS`` is the matrix (a row per
endpoint, a column per caller) and ``EXTRA`` the rows it cannot hold (bodies that are
invalid, other people's objects, roles); ``CASES`` lists both, one case per row. Two
smaller tables follow: objects named in the body (``IN_BODY``) and who may use which
model (``MODEL_ACCESS``). Every case gets a population of its own, made through the
control layer, so that a DELETE or a rotation touches no other case.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from paragate import control
from paragate.app import PUBLIC_PATHS, ROUTES, App
from paragate.control.users import SYSTEM_ADMIN
from paragate.gateway import Gateway
from paragate.routes import OPERATIONS
from paragate.store import Store
from paragate.store.schema import audit_log

from .conftest import CLI, build_gateway, force_expiry
from .fake_vllm import FakeVLLM
from .test_completions import auth

# -- the population ------------------------------------------------------------------------

# name, company, role, key_manager; each has a key of the same name. The system admin
# is the built-in user (in the default company, id 1), made with its key.
PEOPLE = [
    ("a_admin", "A", "company_admin", False),
    ("a_km", "A", "user", True),
    ("a_user", "A", "user", False),
    ("b_admin", "B", "company_admin", False),
    ("b_user", "B", "user", False),
]


@dataclass
class World:
    store: Store
    company: dict[str, int] = field(default_factory=dict)  # "A", "B"
    user: dict[str, int] = field(default_factory=dict)  # by name, "sysadmin" included
    key: dict[str, str] = field(default_factory=dict)  # key name -> public id
    secret: dict[str, str] = field(default_factory=dict)  # key name -> the whole key
    replica: dict[str, int] = field(default_factory=dict)  # model -> its first replica

    def add_key(self, name: str, **how: Any) -> None:
        made = control.keys.create(self.store, CLI, name=name, **how)
        assert made.secret is not None
        self.key[name], self.secret[name] = made.record.public_id, made.secret


def populate(store: Store, upstream_url: str) -> World:
    """Companies A and B, the people above, the system admin, four models (for every
    company, for A only, for B only, disabled), and beside the people's keys: an expired
    and a revoked key of a_user, and a key of a_user restricted to the open model."""
    w = World(store)
    for name in ("A", "B"):
        w.company[name] = control.companies.create(store, CLI, f"Company {name}").id
    for name, company, role, key_manager in PEOPLE:
        w.user[name] = control.users.create(
            store, CLI, company_id=w.company[company], email=f"{name}@example.com",
            role=role, key_manager=key_manager).id
        w.add_key(name, user_id=w.user[name])
    w.add_key("sysadmin", builtin=SYSTEM_ADMIN)
    w.user["sysadmin"] = control.keys.get(store, CLI, w.key["sysadmin"]).record.user_id
    models: list[tuple[str, dict[str, Any]]] = [
        ("open", {}), ("a-only", {"company_ids": [w.company["A"]]}),
        ("b-only", {"company_ids": [w.company["B"]]}), ("off", {"enabled": False})]
    for name, fields in models:
        control.models.create(store, CLI, name, upstream_url=upstream_url,
                              upstream_model="ok", **fields)
        w.replica[name] = control.replicas.list_(store, CLI, name)[1][0].id
    w.add_key("expired", user_id=w.user["a_user"])
    force_expiry(store, w.key["expired"], datetime.now(UTC) - timedelta(seconds=1))
    w.add_key("revoked", user_id=w.user["a_user"])
    control.keys.revoke(store, CLI, w.key["revoked"])
    w.add_key("a_restricted", user_id=w.user["a_user"], models=["open"])
    return w


@pytest.fixture
def world(store: Store, fake: FakeVLLM) -> World:
    return populate(store, fake.base_url)


@pytest.fixture
async def gw(store: Store, world: World, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway = build_gateway(store, tmp_path)
    await gateway.start()  # after the seeding: its first view holds the whole population
    yield gateway
    await gateway.stop()


@pytest.fixture
async def api(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=App(gw))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


# -- the objects in the path ---------------------------------------------------------------

PLAIN_USERS = {"a_km", "a_user", "b_user"}
PEER = {"a_km": "a_user", "a_user": "a_km", "b_user": "b_admin"}  # same company, not them
MISSING = {"company": "999999", "user": "999999", "key": "0123456789ab",
           "model": "no-such-model"}
KINDS = {"companies": "company", "users": "user", "api-keys": "key", "models": "model"}


def kind_of(path: str) -> str:
    return KINDS[path.removeprefix("/api/v2/").split("/")[0]]


def target(w: World, caller: str, kind: str, which: str) -> str:
    """The id in the path. ``own``: the caller's company's (for a plain user, their own
    user and key; for the others, a_user's or b_user's); ``other``: the other company's;
    ``self``: the caller's own user or key; ``peer``: another user's in the same company;
    ``missing``: nobody's."""
    if which == "missing":
        return MISSING[kind]
    home = "B" if caller == "b_user" else "A"
    company = home if which != "other" else {"A": "B", "B": "A"}[home]
    if kind == "company":
        return str(w.company[company])
    if kind == "model":
        return f"{company.lower()}-only"
    if which == "self" or (which == "own" and caller in PLAIN_USERS):
        person = caller
    elif which == "peer":
        person = PEER[caller]
    else:
        person = f"{company.lower()}_user"
    return str(w.user[person]) if kind == "user" else w.key[person]


# -- the table -----------------------------------------------------------------------------

S, CA, KM, U, BU = "sysadmin", "a_admin", "a_km", "a_user", "b_user"
CALLERS = (S, CA, KM, U, BU)  # the columns of ENDPOINTS, in this order
NO_KEY = ("expired", "revoked", "nokey")  # 401 on every row of ENDPOINTS

# A cell for a path with an object: the answers for its (own, other, missing) object.
ALL = (200, 200, 404)  # every company's objects are in scope
MINE = (200, 404, 404)  # only the caller's own company's (a plain user's: their own)
NEVER = (403, 403, 403)  # the role may never: 403 before any 404
NONE = (404, 404, 404)
CREATED = (201, 201, 404)
LAST = (409, 409, 404)  # a model's last replica cannot go

Body = dict[str, Any] | bytes | None
RENAME = {"name": "Renamed"}
NEW_USER = {"email": "new@example.com"}
NEW_MODEL = {"name": "new-model", "upstream_url": "http://127.0.0.1:9/v1"}
NOT_JSON = b'{"name": '

ENDPOINTS: list[tuple[Any, ...]] = [
    # method, path, a valid body, then the answers for: sysadmin, a_admin, a_km, a_user, b_user
    ("GET", "/api/v2/companies", None, 200, 200, 403, 403, 403),
    ("POST", "/api/v2/companies", {"name": "C"}, 201, 403, 403, 403, 403),
    ("GET", "/api/v2/companies/{id}", None, ALL, MINE, NEVER, NEVER, NEVER),
    ("PATCH", "/api/v2/companies/{id}", RENAME, ALL, MINE, NEVER, NEVER, NEVER),
    ("DELETE", "/api/v2/companies/{id}", None, ALL, NEVER, NEVER, NEVER, NEVER),
    ("GET", "/api/v2/users", None, 200, 200, 403, 403, 403),
    ("POST", "/api/v2/users", NEW_USER, 201, 201, 403, 403, 403),
    ("GET", "/api/v2/users/{id}", None, ALL, MINE, NEVER, NEVER, NEVER),
    ("PATCH", "/api/v2/users/{id}", RENAME, ALL, MINE, NEVER, NEVER, NEVER),
    ("DELETE", "/api/v2/users/{id}", None, ALL, MINE, NEVER, NEVER, NEVER),
    ("GET", "/api/v2/api-keys", None, 200, 200, 200, 200, 200),
    ("POST", "/api/v2/api-keys", {"name": "new"}, 201, 201, 201, 403, 403),
    ("GET", "/api/v2/api-keys/{id}", None, ALL, MINE, MINE, MINE, MINE),
    ("PATCH", "/api/v2/api-keys/{id}", RENAME, ALL, MINE, MINE, NEVER, NEVER),
    ("DELETE", "/api/v2/api-keys/{id}", None, ALL, MINE, MINE, MINE, MINE),
    ("POST", "/api/v2/api-keys/{id}/rotate", None, ALL, MINE, MINE, NEVER, NEVER),
    ("GET", "/api/v2/models", None, 200, 200, 200, 200, 200),
    ("GET", "/api/v2/status", None, 200, 200, 200, 200, 200),
    ("POST", "/api/v2/models", NEW_MODEL, 201, 403, 403, 403, 403),
    # a system admin's key uses models like any key of the default company: A's and B's
    # models are not its to use (it sees the whole catalog with ?all=true, in EXTRA)
    ("GET", "/api/v2/models/{model}", None, NONE, MINE, MINE, MINE, MINE),
    ("PATCH", "/api/v2/models/{model}", {"display_name": "X"}, ALL, NEVER, NEVER, NEVER,
     NEVER),
    ("DELETE", "/api/v2/models/{model}", None, ALL, NEVER, NEVER, NEVER, NEVER),
    ("GET", "/api/v2/models/{model}/replicas", None, ALL, NEVER, NEVER, NEVER, NEVER),
    ("POST", "/api/v2/models/{model}/replicas", {"url": "http://127.0.0.1:9/v2"}, CREATED,
     NEVER, NEVER, NEVER, NEVER),
    ("PATCH", "/api/v2/models/{model}/replicas/{replica}", {"weight": 2}, ALL, NEVER,
     NEVER, NEVER, NEVER),
    ("DELETE", "/api/v2/models/{model}/replicas/{replica}", None, LAST, NEVER, NEVER,
     NEVER, NEVER),
    ("GET", "/api/v2/audit-log", None, 200, 200, 403, 403, 403),
    ("GET", "/api/v2/me", None, 200, 200, 200, 200, 200),
    # every role reports; the scope narrows what it covers (tests/test_reporting.py)
    ("GET", "/api/v2/reporting/usage", None, 200, 200, 200, 200, 200),
]


@dataclass(frozen=True)
class Case:
    caller: str  # a name in CALLERS or NO_KEY
    method: str
    path: str
    which: str | None  # the object in the path (see ``target``); None: the path has none
    body: Body
    status: int
    note: str = ""

    @property
    def id(self) -> str:
        parts = [self.caller, self.method, self.path.removeprefix("/api/v2/"),
                 self.which or "", self.note]
        return "-".join(p for p in parts if p)


def expand() -> list[Case]:
    cases = []
    for method, path, body, *cells in ENDPOINTS:
        for caller, cell in zip(CALLERS, cells, strict=True):
            if isinstance(cell, tuple):
                for which, status in zip(("own", "other", "missing"), cell, strict=True):
                    cases.append(Case(caller, method, path, which, body, status))
            else:
                cases.append(Case(caller, method, path, None, body, cell))
        for caller in NO_KEY:
            obj = "own" if "{" in path else None
            cases.append(Case(caller, method, path, obj, body, 401))
    return cases


EXTRA = [
    # the order: 401 and 403 come before the body is read...
    Case("nokey", "POST", "/api/v2/companies", None, NOT_JSON, 401, "not-json"),
    Case("expired", "PATCH", "/api/v2/api-keys/{id}", "own", {"name": 5}, 401, "bad-body"),
    Case(U, "POST", "/api/v2/companies", None, {"name": 5}, 403, "bad-body"),
    Case(CA, "POST", "/api/v2/companies", None, NOT_JSON, 403, "not-json"),
    Case(CA, "DELETE", "/api/v2/companies/{id}", "own", NOT_JSON, 403, "not-json"),
    Case(KM, "POST", "/api/v2/users", None, {"email": 5}, 403, "bad-body"),
    Case(BU, "PATCH", "/api/v2/users/{id}", "own", {"role": 7}, 403, "bad-body"),
    Case(U, "POST", "/api/v2/api-keys", None, {"bogus": True}, 403, "bad-body"),
    Case(U, "PATCH", "/api/v2/api-keys/{id}", "own", {"name": 5}, 403, "bad-body"),
    Case(CA, "POST", "/api/v2/models", None, {}, 403, "bad-body"),
    Case(CA, "PATCH", "/api/v2/models/{model}", "own", {"enabled": "yes"}, 403, "bad-body"),
    # ...and the object in the path before the body
    Case(CA, "PATCH", "/api/v2/companies/{id}", "other", {"name": 5}, 404, "bad-body"),
    Case(CA, "PATCH", "/api/v2/companies/{id}", "missing", NOT_JSON, 404, "not-json"),
    Case(CA, "PATCH", "/api/v2/users/{id}", "other", {"role": "emperor"}, 404, "bad-body"),
    Case(S, "PATCH", "/api/v2/users/{id}", "missing", NOT_JSON, 404, "not-json"),
    Case(CA, "PATCH", "/api/v2/api-keys/{id}", "other", {"nope": 1}, 404, "bad-body"),
    Case(KM, "PATCH", "/api/v2/api-keys/{id}", "peer", {"name": 5}, 404, "bad-body"),
    Case(S, "PATCH", "/api/v2/models/{model}", "missing", {"enabled": "yes"}, 404,
         "bad-body"),
    # the same bodies on an object in scope are refused (so the rows above test the order)
    Case(S, "POST", "/api/v2/companies", None, {"name": 5}, 400, "bad-body"),
    Case(CA, "PATCH", "/api/v2/companies/{id}", "own", {"name": 5}, 400, "bad-body"),
    Case(CA, "PATCH", "/api/v2/users/{id}", "own", {"role": "emperor"}, 400, "bad-body"),
    Case(S, "PATCH", "/api/v2/users/{id}", "own", NOT_JSON, 400, "not-json"),
    Case(KM, "PATCH", "/api/v2/api-keys/{id}", "own", {"name": 5}, 400, "bad-body"),
    Case(S, "PATCH", "/api/v2/models/{model}", "own", {"enabled": "yes"}, 400, "bad-body"),
    # a plain user reaches their own keys only, not those of others in their company
    Case(KM, "GET", "/api/v2/api-keys/{id}", "peer", None, 404),
    Case(KM, "PATCH", "/api/v2/api-keys/{id}", "peer", RENAME, 404),
    Case(KM, "DELETE", "/api/v2/api-keys/{id}", "peer", None, 404),
    Case(KM, "POST", "/api/v2/api-keys/{id}/rotate", "peer", None, 404),
    Case(U, "GET", "/api/v2/api-keys/{id}", "peer", None, 404),
    Case(U, "DELETE", "/api/v2/api-keys/{id}", "peer", None, 404),
    Case(U, "PATCH", "/api/v2/api-keys/{id}", "peer", RENAME, 403),
    Case(BU, "GET", "/api/v2/api-keys/{id}", "peer", None, 404),
    Case(BU, "DELETE", "/api/v2/api-keys/{id}", "peer", None, 404),
    # roles: nobody grants above their own, and nobody changes their own
    Case(CA, "POST", "/api/v2/users", None, {"email": "x@example.com", "role": "admin"}, 403,
         "role-admin"),
    Case(CA, "POST", "/api/v2/users", None,
         {"email": "x@example.com", "role": "company_admin"}, 201, "role-company-admin"),
    Case(CA, "PATCH", "/api/v2/users/{id}", "own", {"role": "admin"}, 403, "grant-admin"),
    Case(CA, "PATCH", "/api/v2/users/{id}", "own", {"role": "company_admin"}, 200,
         "grant-company-admin"),
    Case(S, "PATCH", "/api/v2/users/{id}", "self", {"role": "user"}, 403, "own-role"),
    Case(CA, "PATCH", "/api/v2/users/{id}", "self", {"role": "user"}, 403, "own-role"),
    Case(CA, "PATCH", "/api/v2/users/{id}", "self", {"role": "admin"}, 403, "own-role-up"),
    Case(KM, "PATCH", "/api/v2/users/{id}", "self", {"role": "company_admin"}, 403,
         "own-role"),
    Case(CA, "PATCH", "/api/v2/users/{id}", "self", {"name": "Me"}, 200, "own-name"),
    Case(CA, "GET", "/api/v2/users/{id}", "self", None, 200),
    Case(CA, "DELETE", "/api/v2/users/{id}", "self", None, 409),
    Case(CA, "PATCH", "/api/v2/api-keys/{id}", "self", RENAME, 200),
    # the whole catalog: ?all=true, for system admins only
    Case(S, "GET", "/api/v2/models?all=true", None, None, 200, "all"),
    Case(S, "GET", "/api/v2/models/{model}?all=true", "own", None, 200, "all"),
    Case(S, "GET", "/api/v2/models/{model}?all=true", "other", None, 200, "all"),
    Case(S, "GET", "/api/v2/models/{model}?all=true", "missing", None, 404, "all"),
    Case(CA, "GET", "/api/v2/models?all=true", None, None, 403, "all"),
    Case(KM, "GET", "/api/v2/models/{model}?all=true", "own", None, 403, "all"),
]

CASES = expand() + EXTRA


# -- helpers -------------------------------------------------------------------------------

ERRORS = {  # status -> the envelope's type, and its possible codes
    400: ("invalid_request_error", {"invalid_value", "invalid_type", "invalid_json",
                                    "unknown_field", "missing_field"}),
    401: ("authentication_error", {"invalid_api_key"}),
    403: ("permission_error", {"permission_denied"}),
    404: ("invalid_request_error", {"not_found", "model_not_found"}),
    409: ("invalid_request_error", {"conflict"}),
}


async def send(api: httpx.AsyncClient, w: World, case: Case) -> httpx.Response:
    path = case.path
    if case.which is not None:
        model = target(w, case.caller, kind_of(path), case.which)
        path = path.replace("{replica}", str(w.replica.get(model, 1)))
        path = re.sub(r"\{\w+\}", model, path)
    headers = {} if case.caller == "nokey" else auth(w.secret[case.caller])
    body = case.body
    if isinstance(body, bytes):
        headers["content-type"] = "application/json"
        return await api.request(case.method, path, headers=headers, content=body)
    return await api.request(case.method, path, headers=headers, json=body)


def check_error(r: httpx.Response) -> None:
    kind, codes = ERRORS[r.status_code]
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and set(err) == {"message", "type", "param", "code"}
    assert err["type"] == kind and err["code"] in codes, err


def assert_same_404(r: httpx.Response, ident: str, missing: httpx.Response,
                    missing_ident: str) -> None:
    """The two answers are the same, byte for byte, but for the id in the message."""
    assert r.status_code == missing.status_code == 404, (r.text, missing.text)
    assert r.headers["content-type"] == missing.headers["content-type"]
    assert r.content.replace(ident.encode(), b"<id>", 1) == missing.content.replace(
        missing_ident.encode(), b"<id>", 1)


def audit_rows(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(audit_log)).scalar_one())


async def ids(api: httpx.AsyncClient, w: World, caller: str, path: str) -> set[Any]:
    r = await api.get(path, headers=auth(w.secret[caller]))
    assert r.status_code == 200, r.text
    return {item["id"] for item in r.json()["data"]}


# -- the tests -----------------------------------------------------------------------------

def test_the_table_covers_every_route() -> None:
    routed = {(m, p) for p, methods in ROUTES.items() for m in methods
              if p not in PUBLIC_PATHS and p not in OPERATIONS}
    assert {(method, path) for method, path, *_ in ENDPOINTS} == routed
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_access(api: httpx.AsyncClient, world: World, case: Case) -> None:
    before = audit_rows(world.store)
    r = await send(api, world, case)
    assert r.status_code == case.status, r.text
    if case.status < 400:
        return
    check_error(r)
    assert audit_rows(world.store) == before, "a refused request changed something"
    if case.status == 404 and case.which not in (None, "missing"):
        kind = kind_of(case.path)
        missing = await send(api, world, replace(case, which="missing"))
        assert_same_404(r, target(world, case.caller, kind, case.which), missing,
                        MISSING[kind])


async def test_filters_never_widen_the_scope(api: httpx.AsyncClient, world: World) -> None:
    b, a_user, b_user = world.company["B"], world.user["a_user"], world.user["b_user"]
    assert await ids(api, world, CA, f"/api/v2/users?company_id={b}") == set()
    assert await ids(api, world, CA, f"/api/v2/api-keys?company_id={b}") == set()
    assert await ids(api, world, CA, f"/api/v2/api-keys?user_id={b_user}") == set()
    assert await ids(api, world, CA, f"/api/v2/audit-log?target=company:{b}") == set()
    assert await ids(api, world, KM, f"/api/v2/api-keys?company_id={b}") == set()
    assert await ids(api, world, KM, f"/api/v2/api-keys?user_id={a_user}") == set()
    # the same filters do narrow, where the scope holds something
    assert await ids(api, world, S, f"/api/v2/users?company_id={b}") == {
        world.user["b_admin"], b_user}
    assert await ids(api, world, S, f"/api/v2/api-keys?company_id={b}") == {
        world.key["b_admin"], world.key["b_user"]}
    assert await ids(api, world, S, f"/api/v2/audit-log?target=company:{b}")
    assert await ids(api, world, CA, f"/api/v2/api-keys?user_id={a_user}") == {
        world.key[k] for k in ("a_user", "expired", "revoked", "a_restricted")}


async def test_listings_hold_the_scope_only(api: httpx.AsyncClient, world: World) -> None:
    k, u, c = world.key, world.user, world.company
    a_user_keys = {k["a_user"], k["expired"], k["revoked"], k["a_restricted"]}
    assert await ids(api, world, U, "/api/v2/api-keys") == a_user_keys
    assert await ids(api, world, KM, "/api/v2/api-keys") == {k["a_km"]}
    assert await ids(api, world, BU, "/api/v2/api-keys") == {k["b_user"]}
    assert await ids(api, world, CA, "/api/v2/api-keys") == a_user_keys | {
        k["a_admin"], k["a_km"]}
    assert await ids(api, world, S, "/api/v2/api-keys") == set(k.values())
    assert await ids(api, world, CA, "/api/v2/users") == {u["a_admin"], u["a_km"],
                                                          u["a_user"]}
    assert await ids(api, world, CA, "/api/v2/companies") == {c["A"]}
    assert await ids(api, world, S, "/api/v2/companies") == {1, c["A"], c["B"]}
    audit = await api.get("/api/v2/audit-log?limit=100", headers=auth(world.secret[CA]))
    assert {e["company_id"] for e in audit.json()["data"]} == {c["A"]}


# An object named in the body, out of the caller's scope, is as missing as one that does
# not exist, and the answer says so in the same words: caller, method, path (its object is
# the caller's own), a body, the field that names the object, the kind of object, one out
# of scope, one in scope, and the answer for the one in scope.
IN_BODY = [
    (CA, "POST", "/api/v2/users", {"email": "x@example.com"}, "company_id", "company",
     "B", "A", 201),
    # the company is out of scope before the role is above the caller's
    (CA, "POST", "/api/v2/users", {"email": "x@example.com", "role": "admin"},
     "company_id", "company", "B", "A", 403),
    (CA, "POST", "/api/v2/api-keys", {"name": "k"}, "user_id", "user", "b_user", "a_user",
     201),
    # the system admin lives in the default company: for A's admin they do not exist
    (CA, "POST", "/api/v2/api-keys", {"name": "k"}, "user_id", "user", "sysadmin", "a_km",
     201),
    (KM, "POST", "/api/v2/api-keys", {"name": "k"}, "user_id", "user", "a_user", "a_km",
     201),
    (KM, "POST", "/api/v2/api-keys", {"name": "k"}, "models", "model", "b-only", "a-only",
     201),
    (KM, "POST", "/api/v2/api-keys", {"name": "k"}, "models", "model", "off", "open", 201),
    (CA, "PATCH", "/api/v2/api-keys/{id}", {}, "models", "model", "b-only", "a-only", 200),
]


def named(w: World, kind: str, name: str | None) -> Any:
    """The body's value for the object ``name`` (None: one that does not exist)."""
    if kind == "model":
        return [name or MISSING["model"]]
    if name is None:
        return int(MISSING[kind])
    return w.company[name] if kind == "company" else w.user[name]


@pytest.mark.parametrize(("caller", "method", "path", "body", "name", "kind", "hidden",
                          "visible", "status"), IN_BODY,
                         ids=[f"{r[0]}-{r[1]}-{r[2].removeprefix('/api/v2/')}-{r[4]}-{r[6]}"
                              for r in IN_BODY])
async def test_objects_named_in_the_body(
        api: httpx.AsyncClient, world: World, caller: str, method: str, path: str,
        body: dict[str, Any], name: str, kind: str, hidden: str, visible: str,
        status: int) -> None:
    path = path.replace("{id}", target(world, caller, "key", "own"))

    async def ask(value: Any) -> httpx.Response:
        return await api.request(method, path, headers=auth(world.secret[caller]),
                                 json={**body, name: value})

    before = audit_rows(world.store)
    r, missing = await ask(named(world, kind, hidden)), await ask(named(world, kind, None))
    assert r.status_code == 404, r.text
    check_error(r)
    ident = hidden if kind == "model" else str(named(world, kind, hidden))
    assert_same_404(r, ident, missing, MISSING[kind])
    assert r.json()["error"]["param"] == name
    assert audit_rows(world.store) == before
    r = await ask(named(world, kind, visible))
    assert r.status_code == status, r.text


async def test_a_company_admin_never_reaches_above_their_role(
        api: httpx.AsyncClient, world: World, gw: Gateway) -> None:
    headers = auth(world.secret[CA])
    # a system admin inside A is visible to A's admin, and out of their reach
    boss = control.users.create(world.store, CLI, company_id=world.company["A"],
                                email="boss@example.com", role="admin").id
    world.add_key("boss", user_id=boss)
    await gw.refresher.refresh()
    before = audit_rows(world.store)
    assert (await api.get(f"/api/v2/users/{boss}", headers=headers)).status_code == 200
    for r in [await api.post("/api/v2/api-keys", headers=headers,
                             json={"name": "k", "user_id": boss}),
              await api.patch(f"/api/v2/users/{boss}", headers=headers, json=RENAME),
              await api.delete(f"/api/v2/users/{boss}", headers=headers),
              await api.patch(f"/api/v2/api-keys/{world.key['boss']}", headers=headers,
                              json=RENAME),
              await api.post(f"/api/v2/api-keys/{world.key['boss']}/rotate",
                             headers=headers),
              await api.delete(f"/api/v2/api-keys/{world.key['boss']}", headers=headers)]:
        assert r.status_code == 403, r.text
        check_error(r)
    assert audit_rows(world.store) == before


# key, model, whether the key may use it
MODEL_ACCESS = [
    ("a_user", "open", True),
    ("a_user", "a-only", True),
    ("a_user", "b-only", False),
    ("a_user", "off", False),
    ("a_admin", "b-only", False),
    ("a_restricted", "open", True),
    ("a_restricted", "a-only", False),
    ("a_restricted", "b-only", False),
    ("b_user", "b-only", True),
    ("b_user", "a-only", False),
    ("sysadmin", "open", True),
    ("sysadmin", "b-only", False),
    ("sysadmin", "off", False),
]


@pytest.mark.parametrize(("key", "model", "usable"), MODEL_ACCESS,
                         ids=[f"{k}-{m}" for k, m, _ in MODEL_ACCESS])
async def test_model_access(api: httpx.AsyncClient, world: World, key: str, model: str,
                            usable: bool) -> None:
    headers = auth(world.secret[key])

    async def complete(name: str) -> httpx.Response:
        return await api.post("/api/v2/completions", headers=headers,
                              json={"model": name, "prompt": "x", "max_tokens": 1})

    async def retrieve(name: str) -> httpx.Response:
        return await api.get(f"/api/v2/models/{name}", headers=headers)

    listing = await api.get("/api/v2/models", headers=headers)
    listed = {m["id"] for m in listing.json()["data"]}
    if usable:
        assert model in listed
        got = await retrieve(model)
        assert got.status_code == 200 and got.json()["id"] == model, got.text
        # where a model's requests go is for system admins only
        for answer in (listing, got):
            assert ("upstream_url" in answer.text) == (key == "sysadmin")
        r = await complete(model)
        assert r.status_code == 200 and r.json()["model"] == model, r.text
        return
    assert model not in listed
    for ask in (retrieve, complete):
        r, missing = await ask(model), await ask(MISSING["model"])
        check_error(r)
        assert r.json()["error"]["code"] == "model_not_found"
        assert_same_404(r, model, missing, MISSING["model"])



# -- another company's model, through every endpoint that names one -----------------------

# each endpoint that takes a model in its body, with a body it would accept
MODEL_BODIES = {
    "/api/v2/completions": {"prompt": "x", "max_tokens": 1},
    "/api/v2/chat/completions": {"messages": [{"role": "user", "content": "x"}],
                                 "max_tokens": 1},
    "/api/v2/embeddings": {"input": "x"},
    "/api/v2/tokenize": {"prompt": "x"},
}


def _headers_alike(r: httpx.Response, other: httpx.Response) -> None:
    varying = {"x-request-id", "x-paragate-overhead-ms", "content-length"}
    assert [(k, v) for k, v in r.headers.items() if k not in varying] == [
        (k, v) for k, v in other.headers.items() if k not in varying]
    assert list(r.headers) == list(other.headers)  # the same headers, in the same order


@pytest.mark.parametrize("caller", ["a_user", "a_admin", "a_restricted", "sysadmin"])
async def test_another_companys_model_is_unknown_everywhere(
        api: httpx.AsyncClient, world: World, caller: str) -> None:
    """For a key of company A, company B's model does not exist: every endpoint that
    names a model answers for it exactly as for a name nobody configured (status,
    headers, body but for the name), it is in no listing and no status page, and the
    usage report filtered by it is the empty report of an unknown model."""
    headers = auth(world.secret[caller])
    hidden, missing = "b-only", MISSING["model"]
    for path, body in MODEL_BODIES.items():
        for form in (False, True):
            sent = ({"data": {"model": hidden, **{k: str(v) for k, v in body.items()
                                                   if not isinstance(v, list)}}}
                    if form and "messages" not in body else {"json": {"model": hidden, **body}})
            r = await api.post(path, headers=headers, **sent)
            unknown = {k: (dict(v, model=missing) if isinstance(v, dict) else v)
                       for k, v in sent.items()}
            m = await api.post(path, headers=headers, **unknown)
            assert r.json()["error"]["code"] == "model_not_found", (path, r.text)
            assert_same_404(r, hidden, m, missing)
            _headers_alike(r, m)
    r, m = [await api.get(f"/api/v2/models/{name}", headers=headers)
            for name in (hidden, missing)]
    assert_same_404(r, hidden, m, missing)
    _headers_alike(r, m)
    for path in ("/api/v2/models", "/api/v2/status"):
        listing = await api.get(path, headers=headers)
        assert listing.status_code == 200, listing.text
        assert hidden not in listing.text
    r, m = [await api.get("/api/v2/reporting/usage", headers=headers,
                          params={"model": name}) for name in (hidden, missing)]
    assert r.status_code == m.status_code
    assert r.content.replace(hidden.encode(), b"<m>") == m.content.replace(
        missing.encode(), b"<m>")
