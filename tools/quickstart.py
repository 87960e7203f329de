"""`make run`: the gateway on its embedded defaults, with a real engine behind it.

Starts a local vLLM (CPU build, installed on first use into ~/.cache/paragate) on the
demo model, registers it as `alfred-4.2` in the default SQLite store, creates an admin
key, starts `paragate serve` and prints a curl command to paste. Ctrl-C (or SIGTERM)
stops both servers, by PID.

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


def _say(message: str) -> None:
    print(f"[quickstart] {message}", file=sys.stderr, flush=True)


DISPLAY_NAME = "Alfred 4.2 (local demo model)"  # marks the record as the quickstart's


def _foreign_model(store: Store) -> str | None:
    """Why this store's alfred-4.2 is not the quickstart's to repoint, or None."""
    try:
        existing = control.models.get(store, CLI, MODEL)
    except NotFound:
        return None
    if existing.display_name == DISPLAY_NAME:
        return None
    return (f"{MODEL} in this store already points at {existing.upstream_url}, and "
            "`make run` will not repoint it: use another store "
            "(PARAGATE_DATABASE_URL=sqlite:///demo.db make run) or remove the model.")


def _register(store: Store, upstream: str) -> None:
    """Point alfred-4.2 at this run's vLLM (its port changes every run)."""
    try:
        control.models.update(store, CLI, MODEL, upstream_url=upstream, upstream_model=MODEL,
                              enabled=True)
    except NotFound:
        control.models.create(store, CLI, MODEL, upstream_url=upstream, upstream_model=MODEL,
                              display_name=DISPLAY_NAME)


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
                                log_path=localvllm.cache_root() / "quickstart-vllm.log")
    gateway: subprocess.Popen[bytes] | None = None
    try:
        vllm.start()
        store = Store(settings.database_url)
        store.migrate()
        _register(store, vllm.base_url)
        token = control.keys.create(store, CLI, name="quickstart admin",
                                    builtin=SYSTEM_ADMIN).secret
        store.close()
        env = {**os.environ, "PARAGATE_PORT": str(settings.port)}
        # A session of its own: Ctrl-C reaches only this script, which then asks the
        # gateway to stop once. Two SIGINTs (the terminal's and ours) make uvicorn exit
        # at once, skipping the shutdown that writes pending usage records.
        gateway = subprocess.Popen([sys.executable, "-m", "paragate", "serve"], env=env,
                                   start_new_session=True)
        base = f"http://{settings.host}:{settings.port}"
        _wait_http(base + "/health", gateway, 30)
        print(f"""
paragate is serving {MODEL} (a real vLLM, pid {vllm.pid}) at {base}
  store: {settings.database_url}    vLLM log: {vllm.log_path}

Admin key (shown once):
  {token}

Try it:
  curl -s {base}/api/v2/completions \\
    -H 'Authorization: Bearer {token}' \\
    -H 'Content-Type: application/json' \\
    -d '{{"model": "{MODEL}", "prompt": "def main(", "max_tokens": 32}}'

Press Ctrl-C to stop.""", flush=True)
        # Watch both: a gateway in front of a dead vLLM would answer 503 to everything.
        while (code := gateway.poll()) is None:
            if (vllm_code := vllm.returncode()) is not None:
                _say(f"vLLM exited ({vllm_code}); the end of its log:\n{vllm.log_tail(15)}")
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
        _say("stopped")


if __name__ == "__main__":
    sys.exit(main())
