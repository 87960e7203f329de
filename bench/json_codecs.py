#!/usr/bin/env python3
"""The JSON work on the gateway's hot path with msgspec, orjson and the stdlib json.

    .venv/bin/python bench/json_codecs.py [--number 20000] [--repeat 7]

Two operations, on one core, each the best of --repeat runs of --number calls:
- request: decode a typical completions request body (~200 bytes) into a dict, change
  `model`, encode it back to bytes (what the gateway does when it must rewrite a body);
- usage: read the `usage` member of a typical non-streamed vLLM response (~700 bytes):
  msgspec decodes into a Struct that skips every other member, orjson and json decode all.
A codec whose package is missing is skipped with a note (orjson is not a dependency).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import timeit
from collections.abc import Callable
from typing import Any

import msgspec

REQUEST = (b'{"model":"llama-3.1-8b-instruct","prompt":"Write a short poem about the sea at '
           b'night, in the style of a sailor\'s song.","max_tokens":128,"temperature":0.7,'
           b'"top_p":0.95,"stop":["\\n\\n","###"],"stream":false}')
RESPONSE = (b'{"id":"cmpl-4f1c2b7e9a0d4e6b8c3a5f7e1d2b4c6a","object":"text_completion",'
            b'"created":1718000000,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{'
            b'"index":0,"text":" Oh the sea at night is black and deep,\\nthe stars above '
            b'are ours to keep,\\nwe sing the waves to sleep, my friends,\\nand row until '
            b'the darkness ends.\\nHeave ho, the lantern swings,\\nthe wind is full of '
            b'salt and things\\nthat only sailors understand,\\nfar away from any land.",'
            b'"logprobs":null,"finish_reason":"length","stop_reason":null,'
            b'"prompt_logprobs":null}],"service_tier":null,"system_fingerprint":null,'
            b'"usage":{"prompt_tokens":24,"total_tokens":152,"completion_tokens":128,'
            b'"prompt_tokens_details":null},"kv_transfer_params":null}')
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class Usage(msgspec.Struct):  # as paragate.proxy reads it
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class WithUsage(msgspec.Struct):
    usage: Usage | None = None


Ops = tuple[Callable[[], bytes], Callable[[], Any]]  # (request rewrite, usage read)


def msgspec_ops() -> Ops:
    enc, dec = msgspec.json.Encoder(), msgspec.json.Decoder()
    usage_dec = msgspec.json.Decoder(WithUsage)

    def request() -> bytes:
        body = dec.decode(REQUEST)
        body["model"] = MODEL
        return enc.encode(body)

    def usage() -> Any:
        u = usage_dec.decode(RESPONSE).usage
        return u and (u.prompt_tokens, u.completion_tokens, u.total_tokens)

    return request, usage


def orjson_ops() -> Ops:
    import orjson

    def request() -> bytes:
        body = orjson.loads(REQUEST)
        body["model"] = MODEL
        return orjson.dumps(body)

    def usage() -> Any:
        u = orjson.loads(RESPONSE).get("usage")
        return u and (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])

    return request, usage


def stdlib_ops() -> Ops:
    def request() -> bytes:
        body = json.loads(REQUEST)
        body["model"] = MODEL
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    def usage() -> Any:
        u = json.loads(RESPONSE).get("usage")
        return u and (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])

    return request, usage


CODECS: dict[str, tuple[str, Callable[[], Ops]]] = {
    "msgspec": ("msgspec", msgspec_ops),
    "orjson": ("orjson", orjson_ops),
    "json (stdlib)": ("json", stdlib_ops),
}


def best_us(fn: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=20000, help="calls per timed run")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs; the best one counts")
    args = ap.parse_args()
    expected = json.loads(REQUEST) | {"model": MODEL}
    results: dict[str, tuple[float, float]] = {}
    notes: list[str] = []
    for name, (package, make) in CODECS.items():
        if importlib.util.find_spec(package) is None:
            notes.append(f"{name}: skipped, `{package}` is not installed.")
            print(notes[-1], file=sys.stderr, flush=True)
            continue
        request, usage = make()
        if json.loads(request()) != expected or usage() != (24, 128, 152):
            raise RuntimeError(f"{name}: wrong result")
        print(f"{name}: timing", file=sys.stderr, flush=True)
        results[name] = (best_us(request, args.number, args.repeat),
                         best_us(usage, args.number, args.repeat))
    base = results.get("msgspec")
    print(f"Request {len(REQUEST)} bytes, response {len(RESPONSE)} bytes; "
          f"Python {sys.version.split()[0]}, msgspec {msgspec.__version__}.\n")
    print("| codec | request: decode + set model + encode | usage from response |")
    print("|---|---|---|")
    for name, (req_us, use_us) in results.items():
        ratio = (f" ({req_us / base[0]:.1f}x msgspec)", f" ({use_us / base[1]:.1f}x msgspec)"
                 ) if base else ("", "")
        print(f"| {name} | {req_us:.2f} µs{ratio[0]} | {use_us:.2f} µs{ratio[1]} |")
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
