"""CORS: which web pages may call the API from a browser (``PARAGATE_CORS_ORIGINS``).

Off by default: no ``Access-Control-*`` header on any answer, and an ``OPTIONS`` request
is routed like any other (405). With origins listed:

- a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``, on any
  path) is answered by ``app`` before routing, without a key (browsers send none on a
  preflight) and without reaching a handler: 204 with the allow headers for a listed
  origin, 403 ``origin_not_allowed`` without them for any other;
- every other answer to a listed origin carries ``Access-Control-Allow-Origin`` (that
  origin; ``*`` when any origin is allowed) and ``Access-Control-Expose-Headers``; an
  unlisted origin gets none, so its page cannot read the answer;
- every answer carries ``Vary: Origin`` (not with ``*``), so that a cache never hands one
  origin's answer to another.

Keys are bearer tokens, never cookies, so no ``Access-Control-Allow-Credentials``: a
page must hold a key to call the API, and the key's own permissions apply.
"""

from __future__ import annotations

import re

__all__ = ["Cors"]

Headers = list[tuple[bytes, bytes]]

_METHODS = b"GET, POST, PATCH, DELETE"
# asked for by a browser's fetch beside the CORS-safelisted ones; a preflight asking
# for others gets them back when they are plain header names (the OpenAI SDKs send
# x-stainless-* headers of their own)
_ALLOW_HEADERS = b"authorization, content-type, x-request-id, traceparent, tracestate"
_NAME = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # an HTTP token
_HEADER_LIST = re.compile(_NAME + rb"(?:[ \t]*,[ \t]*" + _NAME + rb")*")
_EXPOSE = (b"access-control-expose-headers", b", ".join([
    b"x-request-id", b"x-paragate-overhead-ms", b"retry-after",
    *(b"x-ratelimit-%s-%s" % (what, kind) for kind in (b"requests", b"tokens")
      for what in (b"limit", b"remaining", b"reset"))]))
MAX_AGE = 600  # seconds a browser may keep a preflight's answer (Chrome keeps 2 h at most)


class Cors:
    """The policy for ``origins`` (``Settings.cors_origin_list()``: ``("*",)`` for any);
    each method is a set lookup and a prebuilt list."""

    __slots__ = ("any", "by_origin", "origins", "vary", "wildcard")

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = origins == ("*",)
        self.origins = frozenset(o.encode() for o in origins if o != "*")
        self.vary: Headers = [] if self.any else [(b"vary", b"origin")]
        self.wildcard: Headers = [(b"access-control-allow-origin", b"*"), _EXPOSE]
        self.by_origin = {o: [(b"access-control-allow-origin", o), *self.vary, _EXPOSE]
                          for o in self.origins}

    def allows(self, origin: bytes) -> bool:
        return self.any or origin in self.origins

    def headers(self, origin: bytes | None) -> Headers:
        """What an answer to a request from ``origin`` carries (None: no ``Origin``)."""
        if origin is None:
            return self.vary
        if self.any:
            return self.wildcard
        return self.by_origin.get(origin, self.vary)

    def preflight(self, origin: bytes, asked: bytes | None) -> Headers:
        """A preflight's answer headers for an allowed ``origin``; ``asked``: its
        ``Access-Control-Request-Headers``."""
        allow = _ALLOW_HEADERS
        if asked and len(asked) <= 2048 and _HEADER_LIST.fullmatch(asked.strip()):
            allow = asked.strip().lower()
        return [(b"access-control-allow-origin", b"*" if self.any else origin),
                (b"access-control-allow-methods", _METHODS),
                (b"access-control-allow-headers", allow),
                (b"access-control-max-age", str(MAX_AGE).encode()),
                (b"vary", b"origin, access-control-request-method, "
                          b"access-control-request-headers")]
