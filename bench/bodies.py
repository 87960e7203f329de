#!/usr/bin/env python3
"""What the checks of issue 13 cost a JSON body: msgspec's decode alone (all the gateway
did before) against ``protocol.json_body`` (the decode, then depth, 64-bit range and
duplicate keys), on typical completions and chat bodies.

    .venv/bin/python bench/bodies.py [--number 2000] [--repeat 7]

Each figure is the best of --repeat runs of --number calls, in microseconds a body, on
one core. The bodies: a 1 KB completion (a prompt and the usual fields), a 100 KB one (a
long prompt, with the colons and newlines of real text), a 100 KB chat (200 messages)
and a prompt of 20,000 token ids.
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from functools import partial

import msgspec

from paragate.protocol.bodies import json_body

TEXT = ("The tide came in at dusk: the harbour lights went on, one by one, and the boats "
        "turned on their moorings.\n")  # ~100 characters of prose, with a colon


def completion(size: int) -> bytes:
    prompt = (TEXT * (size // len(TEXT) + 1))[:size - 200]
    return json.dumps({"model": "llama-3.1-8b-instruct", "prompt": prompt,
                       "max_tokens": 128, "temperature": 0.7, "top_p": 0.95,
                       "stop": ["\n\n", "###"], "stream": True,
                       "stream_options": {"include_usage": True}}).encode()


def chat(messages: int) -> bytes:
    turns = [{"role": "user" if i % 2 else "assistant", "content": TEXT * 5}
             for i in range(messages)]
    return json.dumps({"model": "llama-3.1-8b-instruct", "messages": turns,
                       "max_tokens": 256, "temperature": 0.2}).encode()


BODIES = {
    "completion, 1 KB": completion(1024),
    "completion, 100 KB": completion(100 * 1024),
    "chat, 200 messages (100 KB)": chat(200),
    "prompt of 20,000 token ids (100 KB)": json.dumps(
        {"model": "m", "prompt": [1000 + i % 30000 for i in range(20_000)]}).encode(),
}


def best(fn: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    decode = msgspec.json.decode
    print("| body | bytes | msgspec decode (before), µs | json_body (after), µs | "
          "checks, µs |")
    print("|---|---|---|---|---|")
    for name, raw in BODIES.items():
        before = best(partial(decode, raw), args.number, args.repeat)
        after = best(partial(json_body, raw), args.number, args.repeat)
        print(f"| {name} | {len(raw):,} | {before:.1f} | {after:.1f} | "
              f"{after - before:+.1f} |")


if __name__ == "__main__":
    main()
