#!/usr/bin/env python3
"""How long one request's body holds the event loop: the worst bodies the limits let a
key send, each as large as ``max_body_bytes`` (4 MiB by default) allows.

    .venv/bin/python bench/loop_block.py [--repeat 3] [--email] [--why]

What is timed is the synchronous stretch ``dispatch.forward`` runs once the body is
read, with no await in it: the body parsed and checked (``parse_request`` /
``parse_chat``), then the body for vLLM encoded and the reservation estimated. Every
other task on the worker (every stream) waits that long. The figure is the median of
--repeat runs, in milliseconds; the answer is the status the body gets. --email also
times the standard library's email parser, which paragate used for multipart bodies
before issue 13, on the multipart bodies.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import gc
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote_to_bytes, urlencode

import msgspec

from paragate.config import Settings
from paragate.errors import GatewayError
from paragate.protocol import BodyLimits, ModelRequest, parse_chat, parse_request
from paragate.protocol.bodies import _deeper_than, _unquote

MIB = 1024 * 1024
LIMIT = Settings().max_body_bytes
MP = b"multipart/form-data; boundary=B"
FORM = b"application/x-www-form-urlencoded"
JSON = b"application/json"
Parse = Callable[[bytes | None, bytes, BodyLimits], ModelRequest]


def multipart(fields: list[tuple[str, str]], end: bool = True) -> bytes:
    parts = b"".join(b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                     % (k.encode(), v.encode()) for k, v in fields)
    return parts + (b"--B--\r\n" if end else b"")


def bodies(limits: BodyLimits) -> Iterator[tuple[str, Parse, bytes, bytes]]:
    """(what, parse, content type, body), each body at most LIMIT bytes."""
    head = [("model", "m"), ("prompt", "p")]
    tiny = multipart([("f", "x")], end=False)
    yield ("multipart: tiny parts, as many as fit", parse_request, MP,
           tiny * (LIMIT // len(tiny) - 1) + b"--B--\r\n")
    n = limits.max_form_fields - len(head)
    per = (LIMIT - 40_000) // n
    yield (f"multipart: {limits.max_form_fields} parts of {per // 1024} KiB",
           parse_request, MP, multipart(head + [(f"f{i}", "x" * per) for i in range(n)]))
    big = limits.max_form_part_bytes - 16
    yield ("multipart: parts of max_form_part_bytes, JSON text", parse_request, MP,
           multipart(head + [(f"f{i}", "[" + "1," * (big // 2 - 1) + "1]")
                             for i in range(LIMIT // limits.max_form_part_bytes - 1)]))
    yield ("multipart: parts of max_form_part_bytes, JSON arrays of arrays",
           parse_request, MP,
           multipart(head + [(f"f{i}", "[" + "[]," * (big // 3 - 1) + "[]]")
                             for i in range(LIMIT // limits.max_form_part_bytes - 1)]))
    yield ("urlencoded: tiny fields, as many as fit", parse_request, FORM,
           b"f=1&" * (LIMIT // 4))
    yield (f"urlencoded: {limits.max_form_fields} fields, every byte %-escaped",
           parse_request, FORM,
           urlencode(head + [(f"f{i}", "é" * (per // 6)) for i in range(n)]).encode())
    pad = LIMIT - 64

    def body(value: bytes) -> bytes:
        return b'{"model": "m", "prompt": "p", "x": ' + value + b"}"

    yield "JSON: one long string", parse_request, JSON, body(b'"' + b"a" * pad + b'"')
    yield ("JSON: 100,000 nested arrays (refused)", parse_request, JSON,
           body(b"[" * 100_000 + b"]" * 100_000))
    depth = limits.max_json_depth - 1
    unit = b"[" * depth + b"]" * depth + b","
    yield (f"JSON: arrays {depth} deep, as many as fit", parse_request, JSON,
           body(b"[" + unit * (pad // len(unit)) + b"0]"))
    yield "JSON: empty arrays, as many as fit", parse_request, JSON, body(
        b"[" + b"[]," * (pad // 3) + b"0]")
    yield "JSON: one object, as many keys as fit", parse_request, JSON, body(
        b"{" + b",".join(b'"%x":0' % i for i in range(pad // 10)) + b"}")
    keys = limits.max_json_keys - 3  # the body's own: model, prompt, x
    yield f"JSON: one object of {keys:,} keys", parse_request, JSON, body(
        b"{" + b",".join(b'"%x":0' % i for i in range(keys)) + b"}")
    yield "JSON: the same, one key twice (refused)", parse_request, JSON, body(
        b"{" + b",".join(b'"%x":0' % i for i in range(keys - 1)) + b',"0":1}')
    yield (f"JSON: {keys:,} keys and values that hold brackets and colons",
           parse_request, JSON, body(b"{" + b",".join(
               b'"[%x{:":"%s"' % (i, b"[{:" * ((pad // keys - 16) // 3))
               for i in range(keys)) + b"}"))
    yield "JSON: strings of brackets, as many as fit", parse_request, JSON, body(
        b'["' + b'[{","' * (pad // 6) + b'"]')
    yield "JSON: strings of brackets between arrays (refused)", parse_request, JSON, body(
        b'["' + b'[",[],"' * (pad // 7) + b'"]')
    yield "JSON: a prompt of token ids, as many as fit", parse_request, JSON, (
        b'{"model": "m", "prompt": [' + b"1234," * (pad // 5) + b"1]}")
    message = json.dumps({"role": "user", "content": "Hi"}).encode() + b","
    yield "JSON: chat, as many short messages as fit", parse_chat, JSON, (
        b'{"model": "m", "messages": [' + message * (pad // len(message)) + b'{"role":"user"}]}')


def stretch(parse: Parse, ctype: bytes, raw: bytes, limits: BodyLimits) -> tuple[float, str]:
    """Seconds of the synchronous stretch, and the status the body gets."""
    start = time.perf_counter()
    try:
        req = parse(ctype, raw, limits)
        req.upstream_body("served", max_logprobs=5, default_max_tokens=None,
                          max_tokens_limit=None)
        req.reservation(reserve_max_tokens=16384, max_request_tokens=10**12)
        status = "parsed"
    except GatewayError as exc:
        status = str(exc.http_status)
    return time.perf_counter() - start, status


def email_parser(ctype: bytes, raw: bytes) -> float:
    start = time.perf_counter()
    head = b"Content-Type: " + ctype + b"\r\nMIME-Version: 1.0\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    for part in message.iter_parts():
        part.get_param("name", header="content-disposition")
        part.get_payload(decode=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--email", action="store_true")
    parser.add_argument("--why", action="store_true",
                        help="also time the parts the figures are made of")
    args = parser.parse_args()
    limits = BodyLimits.of(Settings())
    print(f"max_body_bytes {LIMIT}, max_form_fields {limits.max_form_fields}, "
          f"max_form_part_bytes {limits.max_form_part_bytes}, "
          f"max_json_depth {limits.max_json_depth}, max_json_containers "
          f"{limits.max_json_containers}, max_json_keys {limits.max_json_keys}\n")
    print("| body | bytes | answer | loop held, ms |")
    print("|---|---|---|---|")
    for what, parse, ctype, raw in bodies(limits):
        assert len(raw) <= LIMIT, (what, len(raw))
        runs = [stretch(parse, ctype, raw, limits) for _ in range(args.repeat)]
        ms = statistics.median(t for t, _ in runs) * 1000
        print(f"| {what} | {len(raw):,} | {runs[0][1]} | {ms:.1f} |")
        if args.email and ctype == MP:
            old = statistics.median(email_parser(ctype, raw) for _ in range(args.repeat))
            print(f"| ... the email parser (before issue 13) | | | {old * 1000:.1f} |")
    if args.why:
        why(limits)


def why(limits: BodyLimits) -> None:
    """What the figures are made of: %-escapes decoded the standard library's way and
    ours; msgspec on 2 M arrays with the garbage collector on and off, and the
    collector's deferred pass once it is back on."""
    def ms(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000

    field = b"%41" * MIB  # 1 M escapes, 3 MiB
    slow, fast = ms(lambda: unquote_to_bytes(field)), ms(lambda: _unquote(None, field))
    print(f"\n- a field of 1 M %-escapes: unquote_to_bytes {slow:.0f} ms, "
          f"bodies._unquote {fast:.0f} ms")
    depth = limits.max_json_depth - 1
    unit = b"[" * depth + b"]" * depth + b","
    raw = b"[" + unit * ((LIMIT - 64) // len(unit)) + b"0]"
    gc.collect()
    on = ms(lambda: msgspec.json.decode(raw))
    gc.disable()
    value: list[Any] = []
    off = ms(lambda: value.append(msgspec.json.decode(raw)))
    gc.enable()
    deferred = ms(lambda: [[] for _ in range(2000)])  # the next allocations: gen 0 is full
    walk = ms(lambda: _deeper_than(value[0], limits.max_json_depth))
    print(f"- 2 M arrays {depth} deep: msgspec decode {on:.0f} ms with the collector on, "
          f"{off:.0f} ms off, then its deferred pass {deferred:.0f} ms; the depth walk "
          f"{walk:.0f} ms")


if __name__ == "__main__":
    main()
