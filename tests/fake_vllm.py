"""A small fake of vLLM's ``/v1/completions`` (and ``/v1/chat/completions``,
``/v1/embeddings``, ``/tokenize`` in the same shapes) for the faults a real vLLM can't be
made to produce on demand.

The served model name picks the behaviour, so one fake serves every case:

=================  ==========================================================
``ok``             answers like vLLM (JSON, or SSE with an optional usage chunk)
``slow``           streams one chunk every 50 ms (for disconnect tests)
``hang``           accepts the request and never answers
``drop``           streams two chunks, then closes the connection mid-stream
``error-event``    streams one chunk, then vLLM's in-stream error event
``status-400``     answers 400 with vLLM's error body (any ``status-NNN``)
``garbage``        answers 200 with a body that is not JSON
``unauthorized``   answers 401 as vLLM does when the upstream API key is wrong
``gated``          streams every text chunk, then waits for ``FakeVLLM.gate`` before
                   the usage chunk and ``[DONE]``
=================  ==========================================================

Streams follow vLLM 0.32: ``stream_options.include_usage`` adds the usage chunk (and
moves ``system_fingerprint`` from each choice's last chunk to it), ``continuous_usage_stats``
with it adds running usage to every chunk; ``n`` choices are interleaved.

Every request body is kept in ``FakeVLLM.requests`` (its path in ``FakeVLLM.paths``);
``FakeVLLM.closed_early`` counts streams whose client went away before the end. With
``FakeVLLM(record_headers=True)``, ``FakeVLLM.headers`` keeps each request's headers too
(case-insensitive multidicts: ``getall`` sees a header sent twice), in the order of
``requests``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

__all__ = ["FINGERPRINT", "FakeVLLM"]

FINGERPRINT = "vllm-fake-0001"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class FakeVLLM:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 record_headers: bool = False) -> None:
        self.host = host
        self.requests: list[dict[str, Any]] = []
        self.record_headers = record_headers
        self.headers: list[CIMultiDict[str]] = []  # with record_headers, one per request
        self.paths: list[str] = []
        self.closed_early = 0
        self.connections = 0
        self.gate = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = port
        self.health_status = 200  # what GET /health answers
        self.health_checks = 0
        self.in_flight = 0
        self.waiting = 0  # reported as vllm:num_requests_waiting
        self.metrics_delay = 0.0  # seconds /metrics takes to answer

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> FakeVLLM:
        app = web.Application()
        app.router.add_post("/v1/completions", self._counted)
        app.router.add_post("/v1/chat/completions", self._counted)
        app.router.add_post("/v1/embeddings", self._counted)
        app.router.add_post("/tokenize", self._counted)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.StreamResponse:
        self.health_checks += 1
        return web.Response(status=self.health_status)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if self.metrics_delay:
            await asyncio.sleep(self.metrics_delay)
        text = ("# HELP vllm:num_requests_running Number of requests in model execution.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{engine="0",model_name="ok"}} {self.in_flight}.0\n'
                f'vllm:num_requests_waiting{{engine="0",model_name="ok"}} {self.waiting}.0\n')
        return web.Response(text=text)

    async def _counted(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await self._completions(request)
        finally:
            self.in_flight -= 1

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.paths.append(request.path)
        if self.record_headers:
            self.headers.append(request.headers.copy())
        model = body["model"]
        if model.startswith("status-"):
            status = int(model.removeprefix("status-"))
            return web.json_response(
                {"error": {"message": f"fake refusal {status}", "type": "BadRequestError",
                           "param": "max_tokens", "code": status}}, status=status)
        if model == "unauthorized":  # vLLM's answer when its --api-key does not match
            return web.json_response({"error": "Unauthorized"}, status=401)
        if model == "hang":
            await asyncio.sleep(3600)
        if model == "garbage":
            return web.Response(body=b"<html>oops</html>", content_type="text/html")
        if request.path == "/tokenize":
            return web.Response(body=_dumps({"count": 3, "max_model_len": 2048,
                                             "tokens": [1, 2, 3], "token_strs": None}),
                                content_type="application/json")
        if request.path == "/v1/embeddings":
            inputs = body["input"]
            many = isinstance(inputs, list) and isinstance(inputs[0], str | list)
            count = len(inputs) if many else 1
            return web.Response(body=_dumps({
                "id": "embd-fake", "object": "list", "created": int(time.time()),
                "model": model, "data": [{"index": i, "object": "embedding",
                                          "embedding": [0.5, -0.25]} for i in range(count)],
                "usage": {"prompt_tokens": 3 * count, "total_tokens": 3 * count,
                          "completion_tokens": 0, "prompt_tokens_details": None}}),
                content_type="application/json")
        chat = request.path == "/v1/chat/completions"
        n_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        created = int(time.time())
        base = {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": model}
        usage = {"prompt_tokens": 3, "total_tokens": 3 + n_tokens,
                 "completion_tokens": n_tokens, "prompt_tokens_details": None}
        if not body.get("stream"):
            text = " tok" * n_tokens
            return web.Response(body=_dumps({
                **base,
                "choices": [{"index": 0, **({"message": {"role": "assistant", "content": text}}
                                            if chat else {"text": text}),
                             "logprobs": None, "finish_reason": "length",
                             "stop_reason": None, "prompt_logprobs": None}],
                "usage": usage, "service_tier": None, "system_fingerprint": FINGERPRINT,
                "kv_transfer_params": None,
            }), content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        running = include_usage and bool(options.get("continuous_usage_stats"))
        n = int(body.get("n") or 1)
        if chat:
            base["object"] = "chat.completion.chunk"
        usage["completion_tokens"] = n_tokens * n
        usage["total_tokens"] = 3 + n_tokens * n
        try:
            for i in range(n_tokens):
                last = i == n_tokens - 1
                for choice in range(n):
                    chunk: dict[str, Any] = {**base, "choices": [{
                        "index": choice, **({"delta": {"content": f" t{i}"}} if chat
                                            else {"text": f" t{i}"}), "logprobs": None,
                        "finish_reason": "length" if last else None, "stop_reason": None}]}
                    if running:
                        chunk["usage"] = {"prompt_tokens": 3, "total_tokens": 3 + i + 1,
                                          "completion_tokens": i + 1}
                    if last and not include_usage:  # as vLLM 0.32 does
                        chunk["system_fingerprint"] = FINGERPRINT
                    await response.write(b"data: " + _dumps(chunk) + b"\n\n")
                if model == "slow":
                    await asyncio.sleep(0.05)
                if model == "drop" and i == 1:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if model == "error-event":
                    error = {"error": {"message": "engine died", "type": "InternalServerError",
                                       "param": None, "code": 500}}
                    await response.write(b"data: " + _dumps(error) + b"\n\n")
                    await response.write(b"data: [DONE]\n\n")
                    return response
            if model == "gated":
                await self.gate.wait()
            if include_usage:
                final = {**base, "choices": [], "usage": {
                    k: v for k, v in usage.items() if k != "prompt_tokens_details"},
                    "system_fingerprint": FINGERPRINT}
                await response.write(b"data: " + _dumps(final) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.closed_early += 1
            raise
        return response
