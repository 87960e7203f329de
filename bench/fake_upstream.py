#!/usr/bin/env python3
"""A fast fake vLLM server (`POST /v1/completions`, `/v1/chat/completions`) for benchmarks.

Both answer as vLLM 0.32 does, JSON or SSE: a chat stream opens with the role chunk
(`{"role":"assistant","content":""}`), then one `delta` chunk a token; with
`stream_options.include_usage` a usage chunk comes before `[DONE]` (and the
`system_fingerprint` moves to it from the last chunk), with `continuous_usage_stats` too
every chunk carries the usage so far (paragate always asks for both).

It shares one core with the load driver, so every request must cost as little CPU as
possible: raw asyncio Protocol on uvloop + httptools (no framework), responses assembled
from byte strings precomputed per (model, max_tokens), and paced streams driven by one
`loop.call_at` chain per connection (no task, no coroutine frame per stream).
`GET /stats` returns its counters (connections accepted, most paced streams open at once...).

    .venv/bin/python bench/fake_upstream.py --port 0 --pace-ms 20 --cpu 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import resource
import signal
import time
from collections import deque
from typing import Any

import httptools
import msgspec
import uvloop


class Message(msgspec.Struct, gc=False):
    content: Any = None  # a string, or a list of content parts


class CompletionRequest(msgspec.Struct, gc=False):
    # Only the fields the fake needs (completions' and chat's); msgspec skips the rest
    # without building objects.
    # gc=False: never part of a cycle, so it need not add to the GC's allocation count.
    model: str = "fake-model"
    prompt: Any = ""
    messages: list[Message] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


DECODER = msgspec.json.Decoder(CompletionRequest)
TOKEN = b" tok"
ID_PREFIX = os.urandom(8).hex().encode()  # ids unique across restarts, cheap per request
FINGERPRINT = b'"vllm-0.32.0-' + ID_PREFIX[:8] + b'"'  # JSON, fixed length
JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
# Starlette (vLLM's server) appends the charset to text/* media types.
SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
DONE_END = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"  # [DONE] event + terminating chunk
EV_START = b'data: {"id":"'
USAGE_FMT = b'"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d'
# The `object` of each answer, spliced into its `mid` (see Server.new_mid).
TEXT, CHAT, CHUNK = b"text_completion", b"chat.completion", b"chat.completion.chunk"


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Template:
    """Everything about a response that depends only on its endpoint, model, max_tokens,
    and, for streams, the usage asked for (the running usage's prompt tokens, if any).

    Per request only `mid` (id + object + created, fixed length) and the final usage
    numbers vary, so the id/created bytes are spliced between precomputed pieces.
    """

    __slots__ = ("ev_pre", "ev_suf", "first", "json_a", "json_b", "n", "stream_parts",
                 "usage_a", "usage_b")

    def __init__(self, chat: bool, model: str, n: int, running: int | None,
                 include_usage: bool, mid_len: int) -> None:
        m = msgspec.json.encode(model)
        self.n = n
        head = b',"model":' + m + b',"choices":[{"index":0,'

        def usage(k: int) -> bytes:  # continuous_usage_stats: the usage after k tokens
            if running is None:
                return b""
            return (b"," + USAGE_FMT % (running, running + k, k)
                    + (b',"completion_tokens_details":null}' if chat else b"}"))

        sufs = []
        if chat:  # the role chunk, then one delta chunk a token
            sufs.append(head + b'"delta":{"role":"assistant","content":""},"logprobs":null,'
                        b'"finish_reason":null}]' + usage(0)
                        + b',"prompt_token_ids":null,"prompt_text":null}')
            for k in range(1, n + 1):
                s = (head + b'"delta":{"content":"' + TOKEN + b'"},"logprobs":null,'
                     + (b'"finish_reason":"length","stop_reason":null' if k == n
                        else b'"finish_reason":null') + b',"token_ids":null}]' + usage(k))
                if k == n and not include_usage:  # else it rides on the usage chunk
                    s += b',"system_fingerprint":' + FINGERPRINT
                sufs.append(s + b"}")
        else:
            sufs = [head + b'"text":"' + TOKEN + b'","logprobs":null,"finish_reason":'
                    + (b'"length"' if k == n else b"null") + b',"stop_reason":null}]'
                    + usage(k) for k in range(1, n + 1)]
            if not include_usage:
                sufs[-1] += b',"system_fingerprint":' + FINGERPRINT
            sufs = [s + b"}" for s in sufs]
        sufs = [s + b"\n\n" for s in sufs]
        # Events sent at once when a paced stream starts: chat's role chunk comes with the
        # first token's, as vLLM sends both for the first output.
        self.first = 2 if chat else 1
        # Event lengths are constant (mid has fixed length), so the chunk-size line is too.
        hdrs = [b"%x\r\n" % (len(EV_START) + mid_len + len(s)) for s in sufs]
        self.ev_pre = [h + EV_START for h in hdrs]
        self.ev_suf = [s + b"\r\n" for s in sufs]
        # Unpaced stream == mid.join(stream_parts): one join, one write.
        parts = [SSE_HEAD + self.ev_pre[0]]
        parts += [self.ev_suf[i] + self.ev_pre[i + 1] for i in range(len(sufs) - 1)]
        parts.append(self.ev_suf[-1])
        self.stream_parts = parts
        self.usage_a = b',"model":' + m + b',"choices":[],'
        self.usage_b = b'},"system_fingerprint":' + FINGERPRINT + b"}\n\n"
        if chat:
            self.json_a = (
                head + b'"message":{"role":"assistant","content":"' + TOKEN * n
                + b'","refusal":null,"annotations":null,"audio":null,"function_call":null,'
                b'"reasoning":null},"logprobs":null,"finish_reason":"length",'
                b'"stop_reason":null,"token_ids":null,"routed_experts":null}],'
                b'"service_tier":null,"system_fingerprint":' + FINGERPRINT + b",")
            self.json_b = (b',"prompt_tokens_details":null,"completion_tokens_details":null},'
                           b'"prompt_logprobs":null,"prompt_token_ids":null,"prompt_text":null,'
                           b'"kv_transfer_params":null,"ec_transfer_params":null,'
                           b'"metrics":null}')
        else:
            self.json_a = (head + b'"text":"' + TOKEN * n
                           + b'","logprobs":null,"finish_reason":"length","stop_reason":null,'
                           b'"prompt_logprobs":null}],')
            self.json_b = (b',"prompt_tokens_details":null},"service_tier":null,'
                           b'"system_fingerprint":' + FINGERPRINT
                           + b',"kv_transfer_params":null}')


class Server:
    def __init__(self, pace_s: float, model: str) -> None:
        self.pace_s = pace_s
        self.model = model
        self.loop = asyncio.get_running_loop()
        self.templates: dict[tuple[bool, str, int, int | None, bool], Template] = {}
        self.conns: set[Conn] = set()
        self.seq = 0
        self.requests = 0
        self.chat = 0
        self.streams = 0
        self.aborted = 0
        self.errors = 0
        self.connections = 0  # accepted, ever: a pooling client opens ~its concurrency
        self.active = 0  # paced streams in progress now, and the most at once
        self.peak_active = 0
        self._created: dict[bytes, tuple[int, bytes]] = {}
        self.mid_len = {obj: len(self.new_mid(obj)) for obj in (TEXT, CHAT, CHUNK)}

    def new_mid(self, obj: bytes) -> bytes:
        # `cmpl-<32 hex>","object":"text_completion","created":<10 digits>`, or
        # `chatcmpl-<16 hex>","object":"chat.completion[.chunk]",...`: fixed length each.
        self.seq += 1
        now = int(time.time())
        created = self._created.get(obj)
        if created is None or created[0] != now:
            created = self._created[obj] = (now, b'","object":"%s","created":%d' % (obj, now))
        if obj is TEXT:
            return b"cmpl-%s%016x%s" % (ID_PREFIX, self.seq, created[1])
        return b"chatcmpl-%s%08x%s" % (ID_PREFIX[:8], self.seq & 0xFFFFFFFF, created[1])

    def stream_done(self) -> None:
        self.active -= 1

    def stats(self, reset_peak: bool = False) -> dict[str, int]:
        """Counters since start; peak_active_streams: since the previous GET /stats."""
        out = {"requests": self.requests, "chat": self.chat, "streams": self.streams,
               "aborted": self.aborted, "errors": self.errors,
               "connections": self.connections, "open_connections": len(self.conns),
               "active_streams": self.active, "peak_active_streams": self.peak_active}
        if reset_peak:
            self.peak_active = self.active
        return out

    def template(self, chat: bool, model: str, n: int, running: int | None = None,
                 include_usage: bool = False) -> Template:
        key = (chat, model, n, running, include_usage)
        tpl = self.templates.get(key)
        if tpl is None:
            if len(self.templates) > 1000:  # bound memory against odd clients
                self.templates.clear()
            tpl = self.templates[key] = Template(
                chat, model, n, running, include_usage, self.mid_len[CHUNK if chat else TEXT])
        return tpl


def prompt_tokens(prompt: Any) -> int:
    # A tokenizer would dominate the fake's CPU; ~4 chars/token is close enough.
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], int):
            return len(prompt)
        prompt = prompt[0] if prompt else ""
        if isinstance(prompt, list):
            return max(1, len(prompt))
    return max(1, (len(str(prompt)) + 3) // 4)


def chat_tokens(messages: list[Message]) -> int:
    # ~4 chars/token of the contents, + 5 a message for the chat template's own tokens.
    chars = 0
    for msg in messages:
        c = msg.content
        if isinstance(c, list):
            chars += sum(len(str(part.get("text", ""))) for part in c
                         if isinstance(part, dict))
        elif c is not None:
            chars += len(str(c))
    return max(1, (chars + 3) // 4 + 5 * len(messages))


def simple(status: bytes, body: bytes, keep: bool) -> bytes:
    conn = b"" if keep else b"connection: close\r\n"
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, len(body), conn, body))


def error_body(code: int, msg: str) -> bytes:
    return msgspec.json.encode({"error": {"message": msg, "type": "BadRequestError",
                                          "param": None, "code": code}})


class Conn(asyncio.Protocol):
    __slots__ = ("body", "i", "keep", "mid", "parser", "pending", "srv", "timer", "tpl",
                 "transport", "url", "usage", "when")

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.pending: deque[tuple[bytes, bytes, bytes, bool]] = deque()
        self.timer: asyncio.TimerHandle | None = None  # set while a paced stream runs
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.srv.conns.add(self)
        self.srv.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.srv.conns.discard(self)
        if self.timer is not None:  # client went away mid-stream: stop the chain
            self.timer.cancel()
            self.timer = None
            self.srv.aborted += 1
            self.srv.stream_done()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.srv.errors += 1
            if self.transport is not None:
                self.transport.write(simple(b"400 Bad Request", error_body(400, "bad http"),
                                            False))
                self.transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        req = (self.parser.get_method(), self.url, b"".join(self.body),
               self.parser.should_keep_alive())
        self.url = b""
        self.body = []
        if self.timer is not None or self.pending:  # pipelined behind a paced stream
            self.pending.append(req)
        else:
            self.handle(*req)

    def handle(self, method: bytes, url: bytes, body: bytes, keep: bool) -> None:
        t = self.transport
        if t is None:
            return
        srv = self.srv
        srv.requests += 1
        path = url.split(b"?", 1)[0]
        chat = path == b"/v1/chat/completions"
        if (chat or path == b"/v1/completions") and method == b"POST":
            try:
                req = DECODER.decode(body)
                if chat and not req.messages:
                    raise msgspec.DecodeError("messages: a non-empty list is required")
            except msgspec.DecodeError as e:
                srv.errors += 1
                t.write(simple(b"400 Bad Request", error_body(400, str(e)), keep))
            else:
                self.completion(t, req, keep, chat)
                return
        elif path == b"/stats" and method == b"GET":  # counters for the benchmark script
            t.write(simple(b"200 OK", msgspec.json.encode(srv.stats(reset_peak=True)), keep))
        elif path == b"/health" and method == b"GET":
            t.write(simple(b"200 OK", b"", keep))
        elif path == b"/v1/models" and method == b"GET":
            t.write(simple(b"200 OK", msgspec.json.encode({"object": "list", "data": [
                {"id": srv.model, "object": "model", "owned_by": "vllm"}]}), keep))
        else:
            t.write(simple(b"404 Not Found", b'{"detail":"Not Found"}', keep))
        if not keep:
            t.close()

    def completion(self, t: asyncio.Transport, req: CompletionRequest, keep: bool,
                   chat: bool) -> None:
        srv = self.srv
        n = max(1, req.max_completion_tokens or req.max_tokens or 16)
        if chat:
            srv.chat += 1
            p = chat_tokens(req.messages or [])
        else:
            p = prompt_tokens(req.prompt)
        if not req.stream:
            tpl = srv.template(chat, req.model, n)
            mid = srv.new_mid(CHAT if chat else TEXT)
            body = b"".join((b'{"id":"', mid, tpl.json_a, USAGE_FMT % (p, p + n, n),
                             tpl.json_b))
            t.write(JSON_HEAD % len(body) + body)
            if not keep:
                t.close()
            return
        srv.streams += 1
        opts = req.stream_options
        include_usage = bool(opts and opts.get("include_usage"))
        # vLLM's rule: running usage only with the final one
        running = p if include_usage and opts and opts.get("continuous_usage_stats") else None
        tpl = srv.template(chat, req.model, n, running, include_usage)
        mid = srv.new_mid(CHUNK if chat else TEXT)
        usage = b""
        if include_usage:
            usage = chunk(b"".join((EV_START, mid, tpl.usage_a, USAGE_FMT % (p, p + n, n),
                                    tpl.usage_b)))
        if srv.pace_s <= 0:  # whole stream in one write: the cheapest possible
            t.write(mid.join(tpl.stream_parts) + usage + DONE_END)
            if not keep:
                t.close()
            return
        # Paced: headers + first event(s) now, then one event per pace via a call_at chain.
        first = tpl.first
        t.write(SSE_HEAD + b"".join(tpl.ev_pre[i] + mid + tpl.ev_suf[i] for i in range(first)))
        if first == len(tpl.ev_pre):
            self.finish_stream(t, usage, keep)
            return
        self.tpl, self.mid, self.usage, self.keep, self.i = tpl, mid, usage, keep, first
        srv.active += 1
        srv.peak_active = max(srv.peak_active, srv.active)
        self.when = srv.loop.time() + srv.pace_s
        self.timer = srv.loop.call_at(self.when, self.tick)

    def tick(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            self.timer = None
            self.srv.aborted += 1
            self.srv.stream_done()
            return
        i, tpl = self.i, self.tpl
        t.write(tpl.ev_pre[i] + self.mid + tpl.ev_suf[i])
        if i + 1 == len(tpl.ev_pre):
            self.timer = None
            self.srv.stream_done()
            self.finish_stream(t, self.usage, self.keep)
            return
        self.i = i + 1
        # Absolute deadlines: lateness of one tick does not drift the whole stream.
        self.when += self.srv.pace_s
        self.timer = self.srv.loop.call_at(self.when, self.tick)

    def finish_stream(self, t: asyncio.Transport, usage: bytes, keep: bool) -> None:
        t.write(usage + DONE_END)
        if not keep:
            t.close()
            return
        while self.pending and self.timer is None and self.transport is not None:
            self.handle(*self.pending.popleft())


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    srv = Server(args.pace_ms / 1000.0, args.model)
    server = await loop.create_server(lambda: Conn(srv), args.host, args.port, backlog=65535,
                                      reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    gc.freeze()  # startup objects are permanent; keep them out of every collection
    print(f"listening on {port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for c in list(srv.conns):  # abort in-flight streams so exit is immediate
        if c.transport is not None:
            c.transport.abort()
    await asyncio.sleep(0)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    counters = " ".join(f"{k}={v}" for k, v in srv.stats().items())
    print(f"fake_upstream: {counters} cpu_s={ru.ru_utime + ru.ru_stime:.2f} "
          f"max_rss_mb={ru.ru_maxrss / 1024:.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 = pick a free port")
    ap.add_argument("--pace-ms", type=float, default=0.0, help="delay between stream events")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this core")
    ap.add_argument("--model", default="fake-model", help="model listed by GET /v1/models")
    args = ap.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one fd per connection
    # SIGINT is handled in serve(); suppress only a ^C that lands before the handler is set.
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
