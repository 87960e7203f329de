"""The `paragate` command, run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}
    environ.update({"PARAGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}", **env})
    return subprocess.run([sys.executable, "-m", "paragate", *args], capture_output=True,
                          text=True, env=environ, timeout=60, cwd=tmp_path)


def test_keys_lifecycle(tmp_path: Path) -> None:
    created = run(tmp_path, "keys", "create", "--name", "ci", "--admin")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("pg-") and " " not in key
    public_id = key.split("-")[1]
    listed = run(tmp_path, "keys", "list")
    assert public_id in listed.stdout and "active" in listed.stdout
    assert key.split("-", 2)[2] not in listed.stdout  # never the secret
    assert run(tmp_path, "keys", "revoke", public_id).returncode == 0
    assert "revoked" in run(tmp_path, "keys", "list").stdout


def test_models_lifecycle(tmp_path: Path) -> None:
    added = run(tmp_path, "models", "add", "alfred-4.2", "--upstream",
                "http://127.0.0.1:8000/v1", "--upstream-model", "served",
                "--upstream-api-key", "sk-secret-upstream")
    assert added.returncode == 0, added.stderr
    listed = run(tmp_path, "models", "list")
    assert "alfred-4.2" in listed.stdout and "served" in listed.stdout
    assert "sk-secret-upstream" not in listed.stdout
    assert run(tmp_path, "models", "update", "alfred-4.2", "--disable").returncode == 0
    assert " no " in run(tmp_path, "models", "list").stdout
    assert run(tmp_path, "models", "remove", "alfred-4.2").returncode == 0
    assert "alfred-4.2" not in run(tmp_path, "models", "list").stdout


@pytest.mark.parametrize(("args", "env", "words"), [
    (["models", "add", "m", "--upstream", "ftp://x"], {}, "must be an http"),
    (["models", "add", "m", "--upstream", "http:///v1"], {}, "with a host"),
    (["models", "add", "m", "--upstream", "http://h/v1", "--upstream-api-key", "a\r\nX: y"],
     {}, "printable ASCII"),
    (["models", "remove", "nope"], {}, "The model 'nope' does not exist"),
    (["keys", "revoke", "000000000000"], {}, "No API key with id"),
    (["keys", "create", "--name", "x" * 51], {}, "at most 50 characters"),
    (["keys", "create", "--name", "k", "--admin", "--user", "2"], {}, "contradict"),
    (["users", "create", "--company", "9", "--email", "a@b.example"], {},
     "No company with id 9"),
    (["users", "create", "--company", "1", "--email", "nope"], {}, "not an email"),
    (["companies", "remove", "1"], {}, "default company cannot be deleted"),
    (["models", "add", "m", "--upstream", "http://h/v1", "--companies", "1,x"], {},
     "comma-separated ids"),
    (["audit", "list", "--since", "yesterday"], {}, "--since takes"),
    (["keys", "create"], {}, "Missing option '--name'"),
    (["models", "update", "nope"], {}, "nothing to change"),
    (["keys", "list"], {"PARAGATE_PORT": "x"}, "port: expected int"),
    (["keys", "list"], {"PARAGATE_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/x"},
     "the store failed"),
    (["nonsense"], {}, "No such command"),
    (["serve", "--port", "abc"], {}, "'abc' is not a valid integer"),
    (["models", "add", "m", "--upstream", "http://h/v1", "--max-logprobs", "50"], {},
     "--max-logprobs"),
    (["keys", "create", "--name", "k", "--bogus"], {}, "No such option '--bogus'"),
    (["models", "add", "m", "--upstream", "http://h/v1", "--log-payloads=yes"], {},
     "does not take a value"),
])
def test_mistakes_are_one_line_errors(tmp_path: Path, args: list[str], env: dict[str, str],
                                      words: str) -> None:
    result = run(tmp_path, *args, **env)
    assert result.returncode != 0
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr


def test_duplicate_model(tmp_path: Path) -> None:
    args = ("models", "add", "m", "--upstream", "http://h/v1")
    assert run(tmp_path, *args).returncode == 0
    again = run(tmp_path, *args)
    assert again.returncode == 1 and "exists already" in again.stderr


@pytest.mark.parametrize("args", [[], ["serve"], ["keys", "create"], ["models", "add"],
                                  ["models", "update"], ["settings"]])
def test_help(tmp_path: Path, args: list[str]) -> None:
    result = run(tmp_path, *args, "--help")
    assert result.returncode == 0
    assert "Usage: paragate" in result.stdout


def test_settings_lists_every_variable(tmp_path: Path) -> None:
    out = run(tmp_path, "settings").stdout
    assert "PARAGATE_DATABASE_URL=" in out and "PARAGATE_UPSTREAM_READ_TIMEOUT=" in out


def test_settings_hide_the_database_password(tmp_path: Path) -> None:
    shown = run(tmp_path, "settings", PARAGATE_DATABASE_URL="postgresql+psycopg://u:s3cret@h/db")
    assert shown.returncode == 0, shown.stderr
    assert "s3cret" not in shown.stdout
    assert "PARAGATE_DATABASE_URL=postgresql+psycopg://u:***@h/db" in shown.stdout


def test_models_update_unset_and_list_limits(tmp_path: Path) -> None:
    assert run(tmp_path, "models", "add", "m", "--upstream", "http://h/v1", "--max-logprobs",
               "2", "--max-tokens-limit", "100", "--upstream-api-key", "sk-up",
               "--display-name", "Model M").returncode == 0
    listed = run(tmp_path, "models", "list").stdout
    assert "Model M" in listed and "max-logprobs=2 max-tokens-limit=100" in listed
    assert "sk-up" not in listed
    done = run(tmp_path, "models", "update", "m", "--unset", "max-logprobs",
               "--unset", "upstream-api-key")
    assert done.returncode == 0, done.stderr
    row = run(tmp_path, "models", "list").stdout.splitlines()[1]
    assert "max-logprobs" not in row and "max-tokens-limit=100" in row
    assert row.split()[-2] == "no"  # no upstream key any more
    both = run(tmp_path, "models", "update", "m", "--unset", "max-tokens-limit",
               "--max-tokens-limit", "5")
    assert both.returncode != 0 and "contradict" in both.stderr


def test_models_log_payloads(tmp_path: Path) -> None:
    """On with --log-payloads, shown by `models list`, off again with --no-log-payloads,
    each change audited; off unless asked for."""
    import json

    assert run(tmp_path, "models", "add", "quiet", "--upstream", "http://h/v1").returncode == 0
    added = run(tmp_path, "models", "add", "loud", "--upstream", "http://h/v1",
                "--log-payloads", "--max-n", "4")
    assert added.returncode == 0, added.stderr
    rows = {line.split()[0]: line for line in run(tmp_path, "models", "list").stdout
            .splitlines()[1:]}
    assert rows["loud"].endswith("max-n=4 log-payloads")
    assert "log-payloads" not in rows["quiet"]
    done = run(tmp_path, "models", "update", "loud", "--no-log-payloads")
    assert done.returncode == 0, done.stderr
    assert "log-payloads" not in run(tmp_path, "models", "list").stdout
    assert run(tmp_path, "models", "update", "quiet", "--log-payloads").returncode == 0
    again = run(tmp_path, "models", "update", "quiet", "--log-payloads")  # no change
    assert again.returncode == 0, again.stderr
    rows = {line.split()[0]: line for line in run(tmp_path, "models", "list").stdout
            .splitlines()[1:]}
    assert rows["quiet"].endswith("log-payloads") and "log-payloads" not in rows["loud"]
    audit = [json.loads(line) for line in run(
        tmp_path, "audit", "list", "--json", "--action", "model.").stdout.splitlines()]
    changes = [(e["action"], e["changes"].get("log_payloads")) for e in audit]
    assert changes == [("model.create", [None, False]), ("model.create", [None, True]),
                       ("model.update", [True, False]), ("model.update", [False, True])]
    assert {e["actor"]["type"] for e in audit} == {"cli"}

