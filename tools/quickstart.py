"""`make run`: the gateway on its embedded defaults, with a real engine behind it.

Starts two local vLLM servers (CPU build, installed on first use into ~/.cache/paragate)
on the demo model: one generating (with the tool parser), one serving the same weights
as an embedding model. Registers them as `alfred-4.2` (type llm) and `alfred-embed` (type
embedding) in the default SQLite store, creates an admin key, starts `paragate serve`
and prints commands to paste: a completion, a chat completion (plain and streamed), an
embedding and a token count, with curl and with the `openai` SDK. Ctrl-C (or SIGTERM)
stops every server, by PID.

This is the path for trying paragate. In production run `paragate serve` against
your own vLLM fleet instead (see the README).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import localvllm

from paragate import control
from paragate.config import ConfigError, load
from paragate.control import Actor
from paragate.control.users import SYSTEM_ADMIN
from paragate.errors import NotFound
from paragate.store import Store

CLI = Actor.cli()  # the quickstart's changes are audited as the CLI's

MODEL = "alfred-4.2"
EMBED_MODEL = "alfred-embed"


def _say(message: str) -> None:
    print(f"[quickstart] {message}", file=sys.stderr, flush=True)


# The display names mark the records as the quickstart's
DISPLAY_NAMES = {MODEL: "Alfred 4.2 (local demo model)",
                 EMBED_MODEL: "Alfred embeddings (local demo model)"}
TYPES = {MODEL: "llm", EMBED_MODEL: "embedding"}


def _foreign_model(store: Store) -> str | None:
    """Why one of this store's demo models is not the quickstart's to repoint, or None."""
    for name, display in DISPLAY_NAMES.items():
        try:
            existing = control.models.get(store, CLI, name)
        except NotFound:
            continue
        if existing.display_name != display:
            return (f"{name} in this store already points at {existing.upstream_url}, and "
                    "`make run` will not repoint it: use another store "
                    "(PARAGATE_DATABASE_URL=sqlite:///demo.db make run) or remove the model.")
    return None


def _register(store: Store, name: str, upstream: str) -> None:
    """Point a demo model at this run's vLLM (its port changes every run)."""
    try:
        control.models.update(store, CLI, name, upstream_url=upstream, upstream_model=name,
                              enabled=True)
    except NotFound:
        control.models.create(store, CLI, name, upstream_url=upstream, upstream_model=name,
                              display_name=DISPLAY_NAMES[name], type=TYPES[name])


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"paragate exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"paragate did not answer on {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, help="gateway port [default: PARAGATE_PORT, 8080]")
    args = parser.parse_args()
    try:
        settings = load(port=args.port)
    except ConfigError as exc:
        _say(f"error: {exc}")
        return 2
    # SIGTERM ends the run like Ctrl-C does, so the servers are always stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    store = Store(settings.database_url)
    store.migrate()
    foreign = _foreign_model(store)
    store.close()
    if foreign:
        _say(f"error: {foreign}")
        return 2
    _say("preparing vLLM and the demo model (first run: a few minutes, then cached)")
    model_dir = localvllm.ensure_demo_model()
    vllm = localvllm.VLLMServer(model_dir, served_model_name=MODEL,
                                log_path=localvllm.cache_root() / "quickstart-vllm.log",
                                extra_args=localvllm.TOOL_ARGS)
    embed = localvllm.VLLMServer(model_dir, served_model_name=EMBED_MODEL,
                                 log_path=localvllm.cache_root() / "quickstart-embed.log",
                                 extra_args=localvllm.EMBED_ARGS)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        vllm.launch()  # side by side: about a minute for both on two cores
        embed.launch()
        vllm.wait_ready()
        embed.wait_ready()
        store = Store(settings.database_url)
        store.migrate()
        _register(store, MODEL, vllm.base_url)
        _register(store, EMBED_MODEL, embed.base_url)
        token = control.keys.create(store, CLI, name="quickstart admin",
                                    builtin=SYSTEM_ADMIN).secret
        assert token is not None  # a new key's secret is shown once, here
        store.close()
        env = {**os.environ, "PARAGATE_PORT": str(settings.port)}
        # A session of its own: Ctrl-C reaches only this script, which then asks the
        # gateway to stop once. Two SIGINTs (the terminal's and ours) make uvicorn exit
        # at once, skipping the shutdown that writes pending usage records.
        gateway = subprocess.Popen([sys.executable, "-m", "paragate", "serve"], env=env,
                                   start_new_session=True)
        base = f"http://{settings.host}:{settings.port}"
        _wait_http(base + "/health", gateway, 30)
        print(_banner(base, token, settings.database_url, vllm, embed), flush=True)
        # Watch them all: a gateway in front of a dead vLLM would answer 503.
        while (code := gateway.poll()) is None:
            for server in (vllm, embed):
                if (vllm_code := server.returncode()) is not None:
                    _say(f"vLLM exited ({vllm_code}); the end of its log:\n"
                         f"{server.log_tail(15)}")
                    return 1
            time.sleep(0.5)
        return code
    except KeyboardInterrupt:
        return 0
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(signal.SIGINT)
            try:
                gateway.wait(timeout=15)
            except subprocess.TimeoutExpired:
                gateway.kill()
        vllm.stop()
        embed.stop()
        _say("stopped")


def _banner(base: str, token: str, database_url: str, vllm: localvllm.VLLMServer,
            embed: localvllm.VLLMServer) -> str:
    def curl(path: str, body: str, stream: bool = False) -> str:
        return (f"  curl -s{'N' if stream else ''} {base}/api/v2/{path} \\\n"
                f"    -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' "
                f"\\\n    -d '{body}'")

    chat = f'"model": "{MODEL}", "messages": [{{"role": "user", "content": "def main("}}]'
    return f"""
paragate is serving {MODEL} (type llm, vLLM pid {vllm.pid}) and {EMBED_MODEL} (type
embedding, vLLM pid {embed.pid}) at {base}
  store: {database_url}
  vLLM logs: {vllm.log_path}, {embed.log_path}

Admin key (shown once):
  {token}

A completion:
{curl("completions", f'{{"model": "{MODEL}", "prompt": "def main(", "max_tokens": 32}}')}
A chat completion, then the same streamed:
{curl("chat/completions", f'{{{chat}, "max_tokens": 32}}')}
{curl("chat/completions", f'{{{chat}, "max_tokens": 32, "stream": true}}', stream=True)}
An embedding, and a token count:
{curl("embeddings", f'{{"model": "{EMBED_MODEL}", "input": "def main():"}}')}
{curl("tokenize", f'{{"model": "{MODEL}", "prompt": "def main():"}}')}
Which models are available now, and the Prometheus metrics (docs/observability.md):
  curl -s {base}/api/v2/status -H 'Authorization: Bearer {token}'
  curl -s {base}/metrics -H 'Authorization: Bearer {token}' | grep '^paragate_requests_total'
With the openai SDK (installed in this venv):
  {sys.executable} -c "import openai
c = openai.OpenAI(base_url='{base}/api/v2', api_key='{token}')
print(c.chat.completions.create(model='{MODEL}', max_tokens=16,
      messages=[{{'role': 'user', 'content': 'def main('}}]).choices[0].message.content)
print(len(c.embeddings.create(model='{EMBED_MODEL}', input='def main():').data[0].embedding))"

Press Ctrl-C to stop."""


if __name__ == "__main__":
    sys.exit(main())
