"""Upstream API keys encrypted at rest (Fernet, from ``cryptography``).

A stored upstream API key is ``enc:v1:`` followed by a Fernet token (AES-128-CBC and an
HMAC-SHA256, the key's 32 bytes split between them). A value without the prefix is one
written before encryption existed: it is used as it is, and encrypted when the store is
next migrated (``Store.migrate``, at every start).

The keys come from ``secret_key`` (``PARAGATE_SECRET_KEY``: one or more Fernet keys,
separated by commas) or ``secret_key_file`` (a file of them, one a line). The first key
encrypts; every key decrypts. That is rotation: add a new key in front, run
``paragate secrets rotate`` (every stored key re-encrypted with the first), then remove
the old one.

With neither set, a SQLite store gets a key file beside its database
(``paragate.db`` -> ``paragate.key``, mode 0600), made the first time a key must be
encrypted and announced by a warning that names it: the embedded default needs no
set-up. Any other store (PostgreSQL, whose gateways share one database from several
machines) has no key then, and storing an upstream API key is refused until one is
configured; keys stored in plaintext before are still used, and a warning counts them.

Decryption happens where the gateway loads the replicas (``Store.changes``), never per
request. Nothing here logs or raises a key or a secret.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, Settings

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

# ``cryptography`` (9 MB of a worker's memory) is imported when a key is first used to
# encrypt or decrypt, not at start: a gateway whose upstreams need no API key never
# loads it (the idle target is < 80 MB).

__all__ = ["PREFIX", "NoSecretKey", "Secrets", "SecretsError", "Undecryptable",
           "generate_key", "is_encrypted", "key_file_beside"]

log = logging.getLogger("paragate.secrets")

PREFIX = "enc:v1:"
_HEADER = ("# The secret key that encrypts paragate's upstream API keys (docs/configuration.md)."
           "\n# Keep it with the database and back it up: without it they cannot be read.\n")
_SEPARATORS = re.compile(r"[,\n]")


class SecretsError(Exception):
    """An upstream API key cannot be encrypted or decrypted."""


class NoSecretKey(SecretsError):
    """No secret key is configured, and none can be made (not a SQLite file store)."""


class Undecryptable(SecretsError):
    """A stored value that none of the configured keys encrypted."""


def generate_key() -> str:
    """A new Fernet key: 32 random bytes, url-safe base64 (what Fernet.generate_key
    makes)."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def _is_key(key: str) -> bool:
    """Fernet's own test of a key: url-safe base64 of exactly 32 bytes."""
    try:
        return len(base64.urlsafe_b64decode(key)) == 32
    except (binascii.Error, ValueError):
        return False


def is_encrypted(value: str) -> bool:
    return value.startswith(PREFIX)


def key_file_beside(database_url: str) -> Path | None:
    """Where the generated key of a SQLite file store lives; None for any other store."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    db = Path(url.database or "")
    return db.with_name(db.stem + ".key")


def _parse(text: str, what: str) -> list[str]:
    """The keys in ``text`` (commas or lines; blank lines and ``#`` comments skipped),
    each checked; the message names the key's position, never the key."""
    keys = [k.strip() for k in _SEPARATORS.split(text)]
    keys = [k for k in keys if k and not k.startswith("#")]
    for n, key in enumerate(keys, 1):
        if not _is_key(key):
            raise ConfigError(
                f"{what}: key {n} is not a Fernet key (32 url-safe base64-encoded bytes; "
                "`paragate secrets generate` prints a new one)")
    return keys


class Secrets:
    """The keys upstream API keys are encrypted with, and where they come from."""

    def __init__(self, keys: Sequence[str] = (), *, source: str = "",
                 generate: Path | None = None) -> None:
        self._keys = list(keys)
        self.source = source  # for messages: PARAGATE_SECRET_KEY, a file's path...
        self._generate = generate  # the key file made when first needed (SQLite)
        self._fernet: MultiFernet | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Secrets:
        """The configured keys (ConfigError when they are bad), else the default."""
        if settings.secret_key and settings.secret_key_file:
            raise ConfigError("secret_key and secret_key_file: set one of them, not both")
        if settings.secret_key:
            return cls(_parse(settings.secret_key, "secret_key"),
                       source="PARAGATE_SECRET_KEY")
        if settings.secret_key_file:
            path = Path(settings.secret_key_file)
            return cls(_read(path, "secret_key_file"), source=f"secret_key_file {path}")
        return cls.for_database(settings.database_url)

    @classmethod
    def for_database(cls, database_url: str) -> Secrets:
        """No key configured: a SQLite file store's generated key file, else none."""
        path = key_file_beside(database_url)
        return cls(source=f"the key file {path}" if path else "no secret key configured",
                   generate=path)

    def _cipher(self, *, create: bool) -> MultiFernet | None:
        if self._fernet is None:
            keys = self._keys
            path = self._generate
            if not keys and path is not None:
                if not path.exists() and create:
                    _create(path)
                if path.exists():  # made by another process since, perhaps
                    try:
                        keys = _read(path, "the generated key file")
                    except ConfigError as exc:
                        raise SecretsError(str(exc)) from None
            if keys:
                from cryptography.fernet import Fernet, MultiFernet

                self._fernet = MultiFernet([Fernet(k) for k in keys])
        return self._fernet

    @property
    def can_encrypt(self) -> bool:
        """Whether a key is configured, or can be made."""
        return bool(self._keys) or self._generate is not None

    def encrypt(self, plain: str) -> str:
        cipher = self._cipher(create=True)
        if cipher is None:
            raise NoSecretKey(
                "Storing an upstream API key needs a secret key to encrypt it: set "
                "PARAGATE_SECRET_KEY or secret_key_file (docs/configuration.md).")
        return PREFIX + cipher.encrypt(plain.encode()).decode("ascii")

    def decrypt(self, stored: str) -> str:
        """The key; a value without the prefix (stored before encryption) as it is."""
        if not is_encrypted(stored):
            return stored
        from cryptography.fernet import InvalidToken

        try:
            return self._open(stored).decrypt(stored[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise Undecryptable(f"none of the secret keys ({self.source}) encrypted "
                                "it") from None

    def rotate(self, stored: str) -> str:
        """The value encrypted with the first key (a plaintext one encrypted)."""
        if not is_encrypted(stored):
            return self.encrypt(stored)
        from cryptography.fernet import InvalidToken

        try:
            token = self._open(stored).rotate(stored[len(PREFIX):].encode())
        except InvalidToken:
            raise Undecryptable(f"none of the secret keys ({self.source}) encrypted "
                                "it") from None
        return PREFIX + token.decode("ascii")

    def _open(self, stored: str) -> MultiFernet:
        cipher = self._cipher(create=False)
        if cipher is None:
            where = (f"{self._generate} does not exist" if self._generate is not None
                     else "set PARAGATE_SECRET_KEY or secret_key_file")
            raise Undecryptable(f"it is encrypted and no secret key is configured ({where})")
        return cipher


def _read(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None
    keys = _parse(text, f"{what} {path}")
    if not keys:
        raise ConfigError(f"{what}: {path} holds no key")
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users than its owner (chmod 600 it): it "
                        "holds the key to the stored upstream API keys", path)
    return keys


def _create(path: Path) -> None:
    """Write a new key to ``path`` (0600), unless another process does first: the key
    is written whole to a file of its own, then linked into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_HEADER + generate_key() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return  # another process made it first: its key is the one
        except OSError:  # a file system without hard links
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return
            with os.fdopen(fd, "w") as f:
                f.write(temporary.read_text())
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    log.warning("generated the secret key that encrypts upstream API keys at rest: %s. "
                "Keep it with the database and back it up (without it the stored upstream "
                "API keys cannot be read), or set PARAGATE_SECRET_KEY instead", path)
