"""The way to vLLM: ``pool`` (keep-alive connections, one request each, never resent),
``balancer`` (which replica gets a request, and another try where one is safe) and
``health`` (each replica's /health and queue, read in the background)."""

from __future__ import annotations

from .pool import Response, Upstreams

__all__ = ["Response", "Upstreams"]
