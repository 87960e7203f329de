"""The stored upstream API keys, re-encrypted with the first secret key (rotation: see
``paragate.secrets``)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import update

from ..errors import Conflict, InvalidRequest
from ..secrets import NoSecretKey, Undecryptable, is_encrypted
from ..store import Store, upstream_keys
from .common import Actor, require_admin

__all__ = ["Rotated", "rotate"]


@dataclass(frozen=True, slots=True)
class Rotated:
    keys: int  # every stored upstream API key, models' and replicas' (deleted ones too)
    plaintext: int  # of them, those that were stored unencrypted


def rotate(store: Store, actor: Actor) -> Rotated:
    """Re-encrypt every stored upstream API key with the first secret key, in one
    transaction: all of them, or none when one cannot be decrypted (named in the
    error). The rows keep their version: every gateway already holds the keys, and one
    that lacks the new secret key keeps serving until it restarts."""
    require_admin(actor)
    with store.change(actor.audit_columns()) as ch:
        found = upstream_keys(ch.conn)
        for table, row_id, what, value in found:
            try:
                sealed = store.secrets.rotate(value)
            except NoSecretKey as exc:
                raise InvalidRequest(str(exc), code="secret_key_missing") from None
            except Undecryptable as exc:
                raise Conflict(f"The upstream API key of {what} cannot be decrypted ({exc}); "
                               "nothing was changed. Add the secret key that encrypted it "
                               "(after the first), then rotate again.",
                               code="undecryptable") from None
            ch.conn.execute(update(table).where(table.c.id == row_id).values(
                upstream_api_key=sealed))
        done = Rotated(len(found), sum(not is_encrypted(v) for *_, v in found))
        ch.audit("secrets.rotate", "secrets", "upstream_api_keys", None,
                 {"keys": [None, done.keys], "plaintext": [None, done.plaintext]})
        return done
