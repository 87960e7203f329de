"""What every operation shares: who acts, pages of results, and the checks of values
that the API and the CLI both accept (the one layer where they are validated)."""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Select, select

from ..access import ADMIN, RANK
from ..errors import GatewayError, InvalidRequest, NotFound, PermissionDenied
from ..secrets import NoSecretKey, SecretsError
from ..store import Store, model_of
from ..store.records import CompanyRecord, ModelRecord
from ..store.schema import companies, models
from ..upstream import urls

__all__ = [
    "INT_MAX",
    "MAX_PAGE",
    "Actor",
    "Page",
    "check_api_key",
    "check_choice",
    "check_int",
    "check_text",
    "check_url",
    "from_unix",
    "live_company",
    "page",
    "require_admin",
    "require_limit_setter",
    "require_rank",
    "same_key",
    "seal",
]

T = TypeVar("T")
MAX_PAGE = 100
INT_MAX = 2**31 - 1  # the store's integer columns (ids, limits)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: a user through one of their keys, or the CLI (which acts as
    a system admin: whoever can run it can read the database anyway)."""

    kind: str  # user | cli
    role: str
    user_id: int | None = None
    company_id: int | None = None
    key_manager: bool = True
    key_public_id: str | None = None
    request_id: str | None = None
    client_addr: str | None = None

    @classmethod
    def cli(cls) -> Actor:
        return cls(kind="cli", role=ADMIN)

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def sees_company(self, company_id: int) -> bool:
        return self.is_admin or company_id == self.company_id

    def audit_columns(self) -> dict[str, Any]:
        return {"actor_type": self.kind, "actor_user_id": self.user_id,
                "actor_key": self.key_public_id, "request_id": self.request_id,
                "client_addr": self.client_addr}


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    data: list[T]
    has_more: bool


def page(conn: Connection, query: Select[Any], key: Any, after: Any, limit: int
         ) -> tuple[list[Any], bool]:
    """Rows of ``query`` after the cursor ``after`` (a value of the column ``key``),
    ``limit`` of them, and whether more follow."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"'limit' must be between 1 and {MAX_PAGE}, got {limit}.",
                             param="limit")
    if after is not None:
        query = query.where(key > after)
    rows = list(conn.execute(query.order_by(key).limit(limit + 1)).mappings())
    return rows[:limit], len(rows) > limit


def require_admin(actor: Actor) -> None:
    if not actor.is_admin:
        raise PermissionDenied("Only system admins may do this.")


def require_limit_setter(actor: Actor) -> None:
    """Rate limits are set by administrators: a user could otherwise lift the limits
    set on their own keys."""
    if RANK[actor.role] < RANK["company_admin"]:
        raise PermissionDenied("Only company admins and system admins may set rate limits.",
                               param="rate_limits")


def require_rank(actor: Actor, role: str, what: str) -> None:
    """403 when ``role`` is above the actor's own."""
    if RANK[role] > RANK[actor.role]:
        raise PermissionDenied(f"A {actor.role} may not {what} a user with the role "
                               f"'{role}'.")


def live_company(conn: Connection, actor: Actor, company_id: int, param: str | None = None
                 ) -> CompanyRecord:
    """The company, if it exists, is not deleted and is in the actor's scope; else 404."""
    if not 1 <= company_id <= INT_MAX:
        raise NotFound(f"No company with id {company_id}.", param=param)
    row = conn.execute(select(companies).where(
        companies.c.id == company_id, companies.c.deleted_at.is_(None))).mappings().first()
    if row is None or not actor.sees_company(company_id):
        raise NotFound(f"No company with id {company_id}.", param=param)
    return CompanyRecord(**row)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_text(value: str, field: str, max_len: int, *, min_len: int = 1) -> str:
    if len(value) < min_len or (min_len and not value.strip()):
        raise InvalidRequest(f"'{field}' must not be empty.", param=field)
    if len(value) > max_len:
        raise InvalidRequest(f"'{field}' must be at most {max_len} characters, got "
                             f"{len(value)}.", param=field)
    if _CONTROL.search(value):
        raise InvalidRequest(f"'{field}' must not contain control characters.", param=field)
    return value


def check_choice(value: str, field: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidRequest(f"'{field}' must be one of {', '.join(choices)}.", param=field)
    return value


def check_int(value: int | None, field: str, lo: int | None = None, hi: int = INT_MAX
              ) -> int | None:
    if value is None:
        return None
    if (lo is not None and value < lo) or value > hi:
        bounds = f"between {lo} and {hi}" if lo is not None else f"at most {hi}"
        raise InvalidRequest(f"'{field}' must be {bounds}, got {value}.", param=field)
    return value


def check_url(url: str, field: str = "upstream_url") -> str:
    """An upstream URL as it is to be stored (``upstream.urls.check``: http(s), a host,
    no credentials, no query; a host name that is not ASCII in its IDNA form). The
    message never repeats the URL: it may hold a password."""
    try:
        return urls.check(url)
    except urls.BadURL as exc:
        raise InvalidRequest(f"'{field}' {exc}.", param=field) from None


def check_api_key(key: str | None, field: str = "upstream_api_key") -> str | None:
    """It goes into an HTTP header: a control character or a space would break (or
    forge) the upstream request head."""
    if key is not None and (not key or not all(33 <= ord(c) < 127 for c in key)):
        raise InvalidRequest(f"'{field}' must be printable ASCII without spaces.",
                             param=field)
    return key


def seal(store: Store, key: str | None, field: str = "upstream_api_key") -> str | None:
    """An upstream API key as it is stored: encrypted (``secrets``); refused when no
    secret key is configured and none can be made."""
    if key is None:
        return None
    try:
        return store.secrets.encrypt(key)
    except NoSecretKey as exc:
        raise InvalidRequest(str(exc), param=field, code="secret_key_missing") from None
    except SecretsError as exc:  # the generated key file cannot be read
        raise GatewayError(f"The upstream API key cannot be encrypted: {exc}.",
                           code="secret_key_unreadable") from None


def same_key(store: Store, stored: str | None, key: str | None) -> bool:
    """Whether a stored upstream API key is ``key`` (one that cannot be decrypted is
    not: setting it again repairs it)."""
    if stored is None or key is None:
        return stored is key
    try:
        return hmac.compare_digest(store.secrets.decrypt(stored), key)
    except SecretsError:
        return False


def from_unix(value: int, field: str) -> datetime:
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise InvalidRequest(f"'{field}' is not a valid Unix time.", param=field) from None


def live_model(conn: Connection, name: str) -> ModelRecord:
    """A model not deleted, by name, else 404 ``model_not_found``."""
    row = conn.execute(select(models).where(
        models.c.name == name, models.c.deleted_at.is_(None))).mappings().first()
    if row is None:
        raise NotFound(f"The model '{name[:200]}' does not exist.", param="model",
                       code="model_not_found")
    return model_of(row)
