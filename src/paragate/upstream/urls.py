"""What an upstream URL may be: checked where it is stored (``control``), and again where
a replica is loaded (``balancer``), for rows stored before these checks.

An upstream URL becomes a request line and a ``Host`` header, and is shown to
administrators and written to logs and metric labels, so it must be plain: http or https,
a host, a port from 1 to 65535, no ``user:password@`` (paragate never sent it as
credentials: it only ended up in the ``Host`` header; an upstream's key is its
``upstream_api_key``), no query string and no fragment (never sent either). A host name
that is not ASCII is stored in its IDNA (punycode) form, as DNS and the ``Host`` header
need it.

Messages never repeat the URL: it may hold a password.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["BadURL", "check", "redacted"]

_HOST = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
_SCHEME = "must be an http:// or https:// URL with a host"


class BadURL(ValueError):
    """Why a URL is refused, as the end of a sentence naming its field."""


def check(url: str) -> str:
    """``url`` as it is stored and used (its host name in IDNA form), else ``BadURL``."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise BadURL(_SCHEME)
    try:
        parts = urlsplit(url)
    except ValueError:  # a bracketed host that is not IPv6, and the like
        raise BadURL(_SCHEME) from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadURL(_SCHEME)
    if "@" in parts.netloc:
        raise BadURL("must not hold a user name or password (user:password@): an "
                     "upstream's key goes in upstream_api_key")
    if "?" in url or "#" in url:
        raise BadURL("must not have a query string (?...) or a fragment (#...)")
    host = parts.hostname
    if not host:
        raise BadURL(_SCHEME)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or parts.netloc.endswith(":"):
        raise BadURL("has a port that is not a number from 1 to 65535")
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadURL("has a host that is not valid") from None
        return url
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:  # an empty label, one over 63 characters, a forbidden one
        raise BadURL("has a host name that is not valid") from None
    if not _HOST.fullmatch(ascii_host):
        raise BadURL("has a host name that is not valid")
    if host.isascii():
        return url
    netloc = ascii_host + (f":{port}" if port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def redacted(url: str) -> str:
    """``url`` as a log or a screen may show it: a ``user:password@``, a query string
    and a fragment replaced by ``***`` (a row stored before the checks may have them)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that cannot be parsed>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc, query="***" if parts.query else "",
                                     fragment="***" if parts.fragment else ""))
