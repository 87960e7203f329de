"""The SSE relay (``proxy.relay_stream``) as a property: however vLLM's stream is cut
into reads, the client gets the same events and the record the same counts.

The relay is driven directly, under a stand-in balancer whose response yields the
stream in the pieces hypothesis chooses, so that every split (inside ``data:``, inside
a multi-byte character, between the two newlines that end an event) is tried, which
TCP on loopback would not reliably produce.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from paragate import proxy
from paragate.proxy import Target, relay_stream
from paragate.usage import Exchange

URL = "http://replica.invalid:8000/v1"
FINGERPRINT = "fp-0001"


@dataclass
class _Replica:
    url: str = URL


class _Response:
    status = 200

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.failure: str | None = None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            await asyncio.sleep(0)
            yield piece


class _Balancer:
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    @asynccontextmanager
    async def post(self, *args: Any) -> AsyncIterator[tuple[_Replica, _Response]]:
        yield _Replica(), _Response(self.pieces)


def _stream(texts: list[list[str]], prompt_tokens: int) -> bytes:
    """vLLM 0.32's stream for ``n = len(texts)`` choices, as paragate asks for it: running
    usage on every chunk, then the usage chunk (with the fingerprint), then [DONE]."""
    events = []
    n = len(texts)
    longest = max(len(t) for t in texts)
    for step in range(longest):
        for i, pieces in enumerate(texts):
            if step >= len(pieces):
                continue
            last = step == len(pieces) - 1
            events.append({"id": "cmpl-1", "object": "text_completion", "created": 1,
                           "model": "served", "choices": [{
                               "index": i, "text": pieces[step], "logprobs": None,
                               "finish_reason": "length" if last else None,
                               "stop_reason": None}],
                           "usage": {"prompt_tokens": prompt_tokens,
                                     "total_tokens": prompt_tokens + step + 1,
                                     "completion_tokens": step + 1}})
    completion = sum(len(t) for t in texts)
    events.append({"id": "cmpl-1", "object": "text_completion", "created": 1,
                   "model": "served", "choices": [],
                   "usage": {"prompt_tokens": prompt_tokens,
                             "total_tokens": prompt_tokens + completion,
                             "completion_tokens": completion},
                   "system_fingerprint": FINGERPRINT})
    assert n >= 1
    body = b"".join(b"data: " + json.dumps(e, ensure_ascii=False,
                                           separators=(",", ":")).encode() + b"\n\n"
                    for e in events)
    return body + b"data: [DONE]\n\n"


async def _relay(stream: bytes, cuts: list[int], *, n: int, want_usage: bool,
                 want_running: bool, known: bool) -> tuple[list[bytes], Exchange]:
    at = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(at) if b > a]
    proxy._FINGERPRINTS.pop(URL, None)
    if known:
        proxy._learn_fingerprint(URL, FINGERPRINT)
    target = Target(fleet=None, body=b"{}", requested_model="alias",  # type: ignore[arg-type]
                    upstream_model="served")
    ex = Exchange(request_id="r1", record=None, stream=True, n=n)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await relay_stream(_Balancer(pieces), target, want_usage, want_running,  # type: ignore[arg-type]
                       n, send, ex)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    body = b"".join(m["body"] for m in sent[1:])
    return body.split(b"\n\n")[:-1], ex


_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                min_size=0, max_size=6)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.lists(_TEXT, min_size=1, max_size=5), min_size=1, max_size=3),
       prompt_tokens=st.integers(1, 5000),
       cuts=st.lists(st.integers(0, 10**6), max_size=40),
       want_usage=st.booleans(), want_running=st.booleans(), known=st.booleans())
def test_any_split_of_the_stream_gives_the_same_events(
        texts: list[list[str]], prompt_tokens: int, cuts: list[int], want_usage: bool,
        want_running: bool, known: bool) -> None:
    stream = _stream(texts, prompt_tokens)
    n = len(texts)
    options = {"n": n, "want_usage": want_usage, "want_running": want_running,
               "known": known}
    whole, ex_whole = asyncio.run(_relay(stream, [], **options))
    split, ex_split = asyncio.run(_relay(stream, cuts, **options))
    if known or want_usage:
        assert split == whole
    else:
        # a fingerprint not yet known is put on each choice's last chunk only when the
        # usage chunk that carries it came in the same read (nothing is held back to
        # wait for it): the events are the same but for that member
        assert [_without_fingerprint(e) for e in split] == [
            _without_fingerprint(e) for e in whole]
    assert split[-1] == b"data: [DONE]"
    for ex in (ex_whole, ex_split):
        assert ex.outcome == "ok" and not ex.partial
        assert ex.prompt_tokens == prompt_tokens
        assert ex.completion_tokens == sum(len(t) for t in texts)
    # what the client gets is what vLLM sent, with the client's name for the model
    # and only the usage it asked for
    for event in whole[:-1]:
        chunk = json.loads(event.removeprefix(b"data: "))
        assert chunk["model"] == "alias"
        if not chunk["choices"]:
            assert want_usage
        elif not (want_usage and want_running):
            assert "usage" not in chunk


def _without_fingerprint(event: bytes) -> Any:
    if event == b"data: [DONE]":
        return event
    chunk = json.loads(event.removeprefix(b"data: "))
    chunk.pop("system_fingerprint", None)
    return chunk
