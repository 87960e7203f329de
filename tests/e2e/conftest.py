"""Real vLLM (CPU build, demo model) with the gateway in front of it, once per session.

`tools/localvllm.py` installs vLLM into its own cached venv and builds the demo model on
first use; later runs reuse both. The generation model runs with the tool parser
(``localvllm.TOOL_ARGS``); the embedding model (the same weights as a pooling model) is
started by the module that needs it and stopped at its end, so that no more than two
vLLM instances run at once (test_replicas starts a second generation replica).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from paragate import control
from paragate.control import Actor
from paragate.control.users import DEFAULT_USER
from paragate.store import Store

from ..servers import GatewayProcess, start_gateway

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import localvllm

SERVED_NAME = "demo-upstream"  # what vLLM calls the model; the gateway calls it alfred-4.2
MODEL = "alfred-4.2"
# The demo model's whole context (tools/demo_model.py MAX_LEN): room for a generation
# that lasts tens of seconds, which the hang-up test needs.
CONTEXT = 16384


@dataclass
class Stack:
    vllm: localvllm.VLLMServer
    gateway: GatewayProcess
    key: str

    @property
    def direct(self) -> str:
        return self.vllm.base_url + "/completions"

    @property
    def through(self) -> str:
        return self.gateway.url + "/api/v2/completions"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("e2e")
    started = time.monotonic()
    model_dir = localvllm.ensure_demo_model()
    # --enable-log-requests: vLLM logs each abort, which is how the tests see one
    vllm = localvllm.VLLMServer(model_dir, served_model_name=SERVED_NAME,
                                log_path=logs / "vllm.log", max_model_len=CONTEXT,
                                extra_args=["--enable-log-requests",
                                            *localvllm.TOOL_ARGS]).start()
    print(f"\nvLLM ready in {time.monotonic() - started:.1f} s (install/build included)")
    try:
        store = Store(f"sqlite:///{logs / 'gateway.db'}")
        store.migrate()
        cli = Actor.cli()
        control.models.create(store, cli, MODEL, upstream_url=vllm.base_url,
                              upstream_model=SERVED_NAME)
        token = control.keys.create(store, cli, name="e2e", builtin=DEFAULT_USER).secret
        assert token is not None
        store.close()
        gateway = start_gateway(logs, f"sqlite:///{logs / 'gateway.db'}")
        # The gateway learns an upstream's system_fingerprint from its first answer and
        # puts it back on the last chunk of streams whose usage it asked for on its own;
        # before that first answer it cannot (docs/usage.md). One answer first, so that
        # every stream compared below is byte for byte what vLLM sends.
        httpx.post(gateway.url + "/api/v2/completions", timeout=120,
                   headers={"Authorization": f"Bearer {token}"},
                   json={"model": MODEL, "prompt": "warm", "max_tokens": 1})
        try:
            yield Stack(vllm, gateway, token)
        finally:
            gateway.stop()
    finally:
        vllm.stop()
