"""Request bodies from bytes to values: JSON, and urlencoded or multipart forms as
(name, text) pairs. A broken or hostile body is refused with a 4xx that names what is
wrong, without echoing more than a short excerpt of it; ``BodyLimits`` bound what a body
may hold beyond its size (``read_body`` bounds that).

The checks are sized against the worst body the limits allow (bench/loop_block.py,
docs/benchmarks.md): a multipart body is parsed by python-multipart, whose scans are
``bytes.find``, with the parts counted as they are seen (the standard library's
``email`` parser, used before, held the event loop for 10 to 20 s on 4 MiB of tiny
parts); an urlencoded one is split with a bound and unescaped by ``binascii``; a JSON
body's arrays, objects and keys, which cost a Python object each and more, are counted
before it is decoded (``json_value``, ``_within_limits``), decoded by msgspec in one call and
checked with a few C-speed passes over the bytes (``_check_json``). What stays is
msgspec's own time on what the limits let through (a long prompt of token ids is the
slowest per byte), bounded by ``max_body_bytes``.
"""

from __future__ import annotations

import binascii
import json
import logging
import re
from dataclasses import dataclass
from itertools import compress
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import msgspec

from ..errors import InvalidRequest, RequestTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

    from ..config import Settings

__all__ = ["INT_MIN", "LIMITS", "UINT_MAX", "BodyLimits", "JSONError", "excerpt",
           "form_pairs", "json_body", "json_value", "multipart_pairs", "urlencoded_pairs"]

INT_MIN, UINT_MAX = -(2**63), 2**64 - 1  # what some integer type holds: int64 or uint64
_EXCERPT = 60  # the most characters of a client's value an error message shows


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """What one body may hold beyond its size: the settings of the same names."""

    max_form_fields: int = 256
    max_form_part_bytes: int = 1024 * 1024
    max_json_depth: int = 128
    max_json_containers: int = 20000
    max_json_keys: int = 100000

    @classmethod
    def of(cls, settings: Settings) -> BodyLimits:
        return cls(settings.max_form_fields, settings.max_form_part_bytes,
                   settings.max_json_depth, settings.max_json_containers,
                   settings.max_json_keys)


LIMITS = BodyLimits()


def excerpt(value: Any, limit: int = _EXCERPT) -> str:
    """``value`` as an error message may show it: JSON (a string's first ``limit``
    characters before it is encoded), cut at ``limit`` characters with an ellipsis. A
    client's megabytes are never sent back, nor written to a log with the error."""
    if isinstance(value, str):
        cut = len(value) > limit
        text = msgspec.json.encode(value[:limit]).decode()
        return text[:-1] + '…"' if cut else text
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, OverflowError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# -- JSON ------------------------------------------------------------------------------

class JSONError(Exception):
    """Why some bytes are not a JSON value the gateway forwards. ``syntax``: they are
    not JSON at all (a form field's text may then be read as text)."""

    def __init__(self, reason: str, *, syntax: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.syntax = syntax


_BOMS = ((b"\xef\xbb\xbf", "UTF-8"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
_AT_BYTE = re.compile(r"\(byte (\d+)\)")
# A high surrogate's escape not followed by a low one's (msgspec: "truncated")
_LONE_HIGH = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])")
_OUT_OF_RANGE = ("holds a number out of range: integers must fit in 64 bits (-2^63 to "
                 "2^64-1) and other numbers in a 64-bit float")
_NOT_MARKS = bytes(set(range(256)) - set(b":[{"))  # all but the bytes the checks count
_NAMED_UP_TO = 256 * 1024  # a duplicate key is named in bodies up to this size
_CONTAINERS = frozenset((list, dict))
_IS_CONTAINER = _CONTAINERS.__contains__


def json_body(raw: bytes, limits: BodyLimits = LIMITS) -> Any:
    """``json_value`` for a whole body: 400 ``invalid_json`` naming what is wrong."""
    try:
        return json_value(raw, limits)
    except JSONError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc.reason}." if exc.syntax
                             else f"The body {exc.reason}.", code="invalid_json") from None


def json_value(raw: bytes, limits: BodyLimits = LIMITS) -> Any:
    """``raw`` as a JSON value, or ``JSONError``: not JSON (a BOM, bad UTF-8, a lone
    surrogate, NaN or Infinity, anything msgspec refuses), nested deeper than
    ``max_json_depth``, a number no integer type or float holds, or a key twice in one
    object."""
    for bom, charset in _BOMS:
        if raw.startswith(bom):
            raise JSONError(f"it starts with a {charset} byte order mark (BOM); send UTF-8 "
                            "JSON without a BOM", syntax=True)
    # What the bytes say before the body is decoded, counted in one C-speed pass that
    # keeps just the bytes counted (a small body is counted as it is: translate's
    # set-up costs more): '[' and '{' bound its arrays and objects, '{' its objects,
    # ':' its keys (with the colons in its strings).
    marks = raw if len(raw) <= 4096 else raw.translate(None, _NOT_MARKS)
    objects = marks.count(b"{")
    containers, colons = marks.count(b"[") + objects, marks.count(b":")
    if containers > limits.max_json_containers or colons > limits.max_json_keys:
        containers, objects = _within_limits(raw, limits)
    try:
        value = msgspec.json.decode(raw)
    except msgspec.ValidationError:  # msgspec's only one without a type: 1e999
        raise JSONError(_OUT_OF_RANGE, syntax=False) from None
    except msgspec.DecodeError as exc:
        raise JSONError(_syntax(raw, str(exc)), syntax=True) from None
    except UnicodeDecodeError:  # msgspec checks strings' UTF-8 with the codec
        raise JSONError("a string is not valid UTF-8", syntax=True) from None
    except RecursionError:  # msgspec's own guard, far deeper than any limit
        raise JSONError(_too_deep(limits), syntax=False) from None
    _check_json(raw, value, (containers, objects, colons), limits)
    return value


def _within_limits(raw: bytes, limits: BodyLimits) -> tuple[int, int]:
    """The arrays and objects of ``raw``, and its objects, counted outside its strings;
    or ``JSONError`` when it holds more arrays and objects than ``max_json_containers``
    (decoding millions of them, a 4 MiB body of ``[]``, holds the loop for seconds, and
    so does the collector afterwards) or more object keys than ``max_json_keys`` (a dict
    of 400,000 keys takes 200 ms to build), known before it is decoded. Called when a
    count of its bytes is over a limit: only strings full of brackets and colons (a
    prompt of code) can bring it under."""
    containers, keys = limits.max_json_containers, limits.max_json_keys
    bare = _outside(raw, containers + keys)
    if bare is None:
        raise JSONError(f"has {_CONTAINERS_TEXT % containers} or {_KEYS_TEXT % keys}",
                        syntax=False)
    objects = bare.count(b"{")
    found = bare.count(b"[") + objects
    if found > containers:
        raise JSONError(f"has {_CONTAINERS_TEXT % containers}", syntax=False)
    if bare.count(b":") > keys:
        raise JSONError(f"has {_KEYS_TEXT % keys}", syntax=False)
    return found, objects


_CONTAINERS_TEXT = ("more than %d arrays and objects (the limit is "
                    "PARAGATE_MAX_JSON_CONTAINERS)")
_KEYS_TEXT = "more than %d object keys (the limit is PARAGATE_MAX_JSON_KEYS)"
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'"[{:'))


def _outside(raw: bytes, most: int) -> bytes | None:
    """The '[', '{' and ':' bytes of ``raw`` that are outside its strings, in C-speed
    passes rather than a regex match a string (300 ms on 4 MiB of short strings), or
    None when there are certainly more than ``most`` of them.

    An escaped backslash, then an escaped quote, are taken out (left to right, as JSON
    pairs a run of backslashes), so every '"' left opens or closes a string. Only the
    quotes and the three marks are kept, and then two adjacent quotes are taken out:
    nothing lies between them, so what was inside a string stays inside. What is left
    alternates a run outside, a quote, a non-empty run inside, a quote, and so on, where
    every run outside but the first and the last is non-empty too: q quotes mean at
    least q / 2 - 1 marks outside. So past 2 * most + 2 quotes there are more than
    ``most``; below, the runs outside are joined with one split."""
    if b"\\" in raw:  # (one byte is found at memchr's speed, two at a third of it)
        if b"\\\\" in raw:
            raw = raw.replace(b"\\\\", b"")
        if b'\\"' in raw:
            raw = raw.replace(b'\\"', b"")
    bare = raw.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    quotes = bare.count(b'"')
    if not quotes:
        return bare
    if quotes > 2 * most + 2:
        return None
    return b"".join(bare.split(b'"')[::2])


def _syntax(raw: bytes, message: str) -> str:
    """msgspec's reason, with what it does not say: NaN and Infinity, lone surrogates."""
    if "surrogate" in message or ("truncated" in message and _LONE_HIGH.search(raw)):
        return ("a string holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                "without its pair), which is not text")
    at = _AT_BYTE.search(message)
    if at is not None:
        pos = int(at.group(1))
        if raw.startswith((b"NaN", b"Infinity", b"-Infinity"), pos):
            return f"NaN and Infinity are not JSON numbers (byte {pos})"
    return message


def _too_deep(limits: BodyLimits) -> str:
    return (f"is nested more than {limits.max_json_depth} levels deep (the limit is "
            "PARAGATE_MAX_JSON_DEPTH)")


def _check_json(raw: bytes, value: Any, counts: tuple[int, int, int],
                limits: BodyLimits) -> None:
    """What msgspec lets through: depth, 64-bit range, duplicate keys. Each check is a
    cheap necessary condition first, the exact test only when it holds; the conditions
    share the counts made before the body was decoded (``json_value``'s)."""
    containers, objects, colons = counts
    depth = limits.max_json_depth
    # Depth: a value sits inside at most as many containers as the body has; only past
    # that are the containers walked (the few of a chat, or of a JSON schema, in
    # microseconds).
    if containers > depth and _deeper_than(value, depth):
        raise JSONError(_too_deep(limits), syntax=False)
    # Range: msgspec decodes any integer up to 4300 digits as a Python int, and msgpack
    # holds exactly int64 and uint64: its encoder is the C-speed range check.
    if len(raw) >= 20:  # the shortest is 18446744073709551616
        try:
            msgspec.msgpack.encode(value)
        except OverflowError:
            raise JSONError(_OUT_OF_RANGE, syntax=False) from None
    key = _duplicate_key(raw, value, objects, colons)
    if key is not None:
        named = f"the key {excerpt(key)}" if key else "a key"
        raise JSONError(f"has {named} twice in one object; send each key once (readers "
                        "disagree on which one counts)", syntax=False)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a value of ``value`` sits inside more than ``limit`` containers: level
    by level, without recursion, each container's items sifted at C speed (a list of a
    million token ids beside a deep schema is not walked item by item in Python)."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):
        below: list[Any] = []
        keep = below.extend
        for container in level:
            items = container.values() if type(container) is dict else container
            keep(compress(items, map(_IS_CONTAINER, map(type, items))))
        if not below:
            return False
        level = below
    return any(level)  # a container at the last level: one more if it is not empty


def _duplicate_key(raw: bytes, value: Any, objects: int, colons: int) -> str | None:
    """A key that some object of ``raw`` holds twice ("" when it is not worth naming),
    or None.

    msgspec keeps the last of two equal keys; vLLM's parser may keep another, and the
    gateway reads one ``model`` and forwards the bytes as they came, so a duplicate is
    refused wherever it is. Sound and cheap: outside strings, valid JSON holds a ':'
    only between a key and its value, and ':' is never part of a UTF-8 sequence. So
    ``raw`` holds P + S colon bytes (P pairs, S colons written as such in its strings),
    and ``value`` encoded back holds P' + S' (msgspec writes every colon as is). A
    duplicate drops a pair and what its value held: P' < P and S' <= S + E, where E is
    the number of colons ``raw`` wrote as the escape \\u003a. Without one, P' = P and
    S' = S + E. With E' >= E the count of "\\u003a" in ``raw`` (a few of them may
    follow an escaped backslash: not escapes), P' + S' = P + S + E' therefore proves
    there is none. Otherwise there is one (E' = 0), or the standard library's parser
    (C, with a Python hook per object) looks at the pairs themselves: the only place
    that can name the key, which is not done for a large body (three times msgspec's
    time) when a duplicate is certain. A body of one object (a completion's) is simpler:
    the keys it holds are P' alone, so P' = P + S proves there is none.
    """
    if colons < 2:  # two equal keys are two pairs, each with its colon
        return None
    if objects == 1 and type(value) is dict and len(value) == colons:
        return None
    again = msgspec.json.encode(value).count(b":")
    escaped = 0
    if b"\\" in raw and b"\\u003" in raw:
        escaped = raw.count(b"\\u003a") + raw.count(b"\\u003A")
    if again == colons + escaped:
        return None
    if not escaped and len(raw) > _NAMED_UP_TO:
        return ""
    return _first_duplicate(raw)


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _pairs_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return obj


def _first_duplicate(raw: bytes) -> str | None:
    try:
        json.loads(raw, object_pairs_hook=_pairs_once)
    except _Duplicate as dup:
        return dup.key
    return None


# -- forms -----------------------------------------------------------------------------

def form_pairs(content_type: bytes, raw: bytes, limits: BodyLimits = LIMITS,
               ) -> list[tuple[str, str]]:
    """An urlencoded or multipart body's (name, text) pairs, in order."""
    media = content_type.split(b";", 1)[0].strip().lower()
    if media == b"multipart/form-data":
        return multipart_pairs(content_type, raw, limits)
    return urlencoded_pairs(raw, limits)


def _too_many(limits: BodyLimits) -> RequestTooLarge:
    return RequestTooLarge(f"The form has more than {limits.max_form_fields} fields (the "
                           "limit is PARAGATE_MAX_FORM_FIELDS).")


def _field(name: str | None) -> str:
    """A form field as a message names it (None: its name, not yet read)."""
    return "A form field's name" if name is None else f"Form field {excerpt(name)}"


def _param(name: str | None) -> str | None:
    return None if name is None else name[:_EXCERPT]


def _too_big(name: str | None, limits: BodyLimits) -> RequestTooLarge:
    return RequestTooLarge(f"{_field(name)} is larger than {limits.max_form_part_bytes} "
                           "bytes (the limit is PARAGATE_MAX_FORM_PART_BYTES).",
                           param=_param(name))


def _text(name: str | None, data: bytes) -> str:
    """``data`` as UTF-8 text, else 400 (``name`` None: the bytes are the name)."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"{_field(name)} is not valid UTF-8.", param=_param(name),
                             code="invalid_body") from None


def urlencoded_pairs(raw: bytes, limits: BodyLimits = LIMITS) -> list[tuple[str, str]]:
    """What ``parse_qsl(keep_blank_values=True)`` reads ('&' between fields, '+' a space,
    empty fields skipped), but strict: a %-escape that is not UTF-8 is refused, not
    replaced; at most ``max_form_fields`` fields, each name and value at most
    ``max_form_part_bytes`` once unescaped."""
    try:
        raw.decode()
    except UnicodeDecodeError:
        raise InvalidRequest("The form body is not valid UTF-8.", code="invalid_body") from None
    cap = limits.max_form_fields
    # Split at most a few times the limit (empty fields are skipped, not counted): a
    # body of a million '&' costs what a few hundred fields do.
    pieces = raw.split(b"&", 4 * cap)
    if len(pieces) > 4 * cap or sum(1 for p in pieces if p) > cap:
        raise _too_many(limits)
    pairs = []
    for piece in pieces:
        if not piece:
            continue
        name_raw, _, value_raw = piece.partition(b"=")
        name = _text(None, _unescaped(None, name_raw, limits))
        pairs.append((name, _text(name, _unescaped(name, value_raw, limits))))
    return pairs


def _unescaped(name: str | None, data: bytes, limits: BodyLimits) -> bytes:
    most = limits.max_form_part_bytes
    # an escape is three bytes for one: more than three times the limit is over it
    text = _unquote(name, data) if len(data) <= 3 * most else None
    if text is None or len(text) > most:
        raise _too_big(name, limits)
    return text


def _unquote(name: str | None, data: bytes) -> bytes:
    """``unquote_to_bytes(data.replace(b"+", b" "))`` at C speed: the %-escapes made
    quoted-printable ones and decoded by ``binascii`` (the standard library's loop
    costs a third of a microsecond an escape, a third of a second for a field of
    them)."""
    data = data.replace(b"+", b" ")
    escapes = data.count(b"%")
    if not escapes:
        return data
    coded = (data.replace(b"=", b"=3D").replace(b"\r", b"=0D").replace(b"\n", b"=0A")
             .replace(b"%", b"="))
    out = binascii.a2b_qp(coded)
    # Each '=' of ``coded`` saves two bytes when it is an escape and fewer otherwise
    # (a '%' not followed by two hex digits, which stands for itself): then the slow
    # way, for the few such a client may send by mistake ("100% sure").
    if len(out) == len(coded) - 2 * coded.count(b"="):
        return out
    if escapes > 4096:
        raise InvalidRequest(f"{_field(name)} holds '%' signs that are not %-escapes "
                             "(write a '%' as %25).", param=_param(name), code="invalid_body")
    return unquote_to_bytes(data)


# python-multipart logs a warning for each malformed body, as plain text on stderr (no
# handler is configured for it): the client is answered 400 and the access log has the
# request; a client sending garbage must not write lines of its choosing to the log.
_QUIET = logging.getLogger("paragate.protocol.multipart")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


class _Parts:
    """python-multipart's callbacks: each part's headers and data, into pairs, with the
    limits applied as the parts are seen."""

    __slots__ = ("data", "ended", "header", "headers", "limits", "name", "pairs", "size",
                 "value")

    def __init__(self, limits: BodyLimits) -> None:
        self.limits = limits
        self.pairs: list[tuple[str, str]] = []
        self.ended = False
        self.headers: dict[bytes, bytes] = {}
        self.header = bytearray()
        self.value = bytearray()
        self.name = ""
        self.data: list[bytes] = []
        self.size = 0

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished,
                "on_part_data": self.part_data, "on_part_end": self.part_end,
                "on_end": self.end}

    def part_begin(self) -> None:
        if len(self.pairs) >= self.limits.max_form_fields:
            raise _too_many(self.limits)
        self.headers = {}
        self.data = []
        self.size = 0

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def header_end(self) -> None:
        self.headers[bytes(self.header).lower()] = bytes(self.value)
        self.header.clear()
        self.value.clear()

    def headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        kind, params = parse_options_header(self.headers.get(b"content-disposition"))
        name = params.get(b"name")
        if kind != b"form-data" or name is None:
            raise InvalidRequest("A multipart/form-data part has no field name (its "
                                 "Content-Disposition must be form-data; name=\"...\").",
                                 code="invalid_body")
        if len(name) > self.limits.max_form_part_bytes:
            raise _too_big(None, self.limits)
        self.name = _text(None, name)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.size > self.limits.max_form_part_bytes:
            raise _too_big(self.name, self.limits)
        self.data.append(data[start:end])

    def part_end(self) -> None:
        data = b"".join(self.data)
        encoding = self.headers.get(b"content-transfer-encoding", b"").strip().lower()
        if encoding in (b"base64", b"quoted-printable"):  # deprecated (RFC 7578), still read
            try:
                data = (binascii.a2b_base64(data) if encoding == b"base64"
                        else binascii.a2b_qp(data))
            except binascii.Error:
                raise InvalidRequest(f"{_field(self.name)} is not valid {encoding.decode()}.",
                                     param=_param(self.name), code="invalid_body") from None
        elif encoding not in (b"", b"7bit", b"8bit", b"binary"):
            raise InvalidRequest(f"{_field(self.name)} has an unknown "
                                 "Content-Transfer-Encoding.", param=_param(self.name),
                                 code="invalid_body")
        self.pairs.append((self.name, _text(self.name, data)))

    def end(self) -> None:
        self.ended = True


def multipart_pairs(content_type: bytes, raw: bytes, limits: BodyLimits = LIMITS,
                    ) -> list[tuple[str, str]]:
    """A multipart/form-data body's fields, parsed by python-multipart: at most
    ``max_form_fields`` parts (the next one stops the parse), each at most
    ``max_form_part_bytes``, 8 headers of at most 4 KiB each. (python-multipart, 4 MB
    of a worker's memory, is imported by the first multipart body.)"""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type.decode("latin-1"))
    boundary = params.get(b"boundary")
    malformed = "The multipart/form-data body is malformed"
    if not boundary:
        raise InvalidRequest(f"{malformed}: its Content-Type names no boundary.",
                             code="invalid_body")
    parts = _Parts(limits)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        parser.logger = _QUIET
        parser.write(raw)
    except FormParserError as exc:  # python-multipart's reasons are short, but cut anyway
        raise InvalidRequest(f"{malformed}: {str(exc)[:120]}.", code="invalid_body") from None
    if not parts.ended:
        raise InvalidRequest(f"{malformed}: it ends before its closing boundary.",
                             code="invalid_body")
    return parts.pairs
