"""Upstream API keys encrypted at rest: the stored form, the keys and where they come
from, rotation, rows written before encryption, a key that cannot be decrypted, and no
secret in any answer, audit row or line of the CLI."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, update

from paragate import control
from paragate.app import App
from paragate.config import ConfigError, Settings
from paragate.errors import Conflict, InvalidRequest
from paragate.secrets import PREFIX, NoSecretKey, Secrets, Undecryptable, generate_key
from paragate.store import Store
from paragate.store.schema import audit_log, model_replicas, models

from .conftest import CLI, add_model, build_gateway, make_key
from .fake_vllm import FakeVLLM
from .test_completions import assert_envelope, auth, post

UPSTREAM_KEY = "sk-upstream-at-rest"
OTHER_KEY = "sk-upstream-other"


def _raw(store: Store) -> list[str | None]:
    """Every stored upstream API key, as the database holds it: models', then replicas'."""
    with store.read() as conn:
        return [*conn.execute(select(models.c.upstream_api_key).order_by(models.c.id))
                .scalars(),
                *conn.execute(select(model_replicas.c.upstream_api_key)
                              .order_by(model_replicas.c.id)).scalars()]


# -- the keys -----------------------------------------------------------------------------


def test_the_first_key_encrypts_and_every_key_decrypts() -> None:
    old, new = generate_key(), generate_key()
    stored = Secrets([old]).encrypt(UPSTREAM_KEY)
    assert stored.startswith(PREFIX) and UPSTREAM_KEY not in stored
    assert Secrets([new, old]).decrypt(stored) == UPSTREAM_KEY
    rotated = Secrets([new, old]).rotate(stored)
    assert Secrets([new]).decrypt(rotated) == UPSTREAM_KEY
    with pytest.raises(Undecryptable, match=r"none of the secret keys \(X\) encrypted it"):
        Secrets([old], source="X").decrypt(rotated)
    assert Secrets([old]).decrypt(UPSTREAM_KEY) == UPSTREAM_KEY  # plaintext: from before
    assert Secrets([old]).rotate(UPSTREAM_KEY).startswith(PREFIX)


def test_keys_from_the_settings(tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    both = Secrets.from_settings(Settings(secret_key=f" {new} , {old} "))
    assert both.source == "PARAGATE_SECRET_KEY"
    assert both.decrypt(Secrets([old]).encrypt("sk-a")) == "sk-a"
    assert Fernet(new.encode()).decrypt(both.encrypt("sk-b")[len(PREFIX):].encode()) == b"sk-b"
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# new first\n{new}\n\n{old}\n")
    keyfile.chmod(0o600)
    from_file = Secrets.from_settings(Settings(secret_key_file=str(keyfile)))
    assert from_file.decrypt(Secrets([old]).encrypt("sk-c")) == "sk-c"
    assert from_file.source == f"secret_key_file {keyfile}"
    refused = [
        (Settings(secret_key=f"{new},not-a-key"), "secret_key: key 2 is not a Fernet key"),
        (Settings(secret_key=new, secret_key_file=str(keyfile)),
         "secret_key and secret_key_file: set one of them, not both"),
        (Settings(secret_key_file=str(tmp_path / "none")), "secret_key_file: cannot read"),
    ]
    for settings, words in refused:
        with pytest.raises(ConfigError) as error:
            Secrets.from_settings(settings)
        assert str(error.value).startswith(words) and new not in str(error.value)
    keyfile.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match="holds no key"):
        Secrets.from_settings(Settings(secret_key_file=str(keyfile)))


def test_the_settings_never_show_the_secret_key() -> None:
    key = generate_key()
    shown = Settings(secret_key=key, secret_key_file="/etc/paragate/keys").shown()
    assert shown["secret_key"] == "***" and key not in str(shown)
    assert shown["secret_key_file"] == "/etc/paragate/keys"
    assert Settings().shown()["secret_key"] == ""


def test_with_no_key_sqlite_makes_a_key_file_beside_its_database(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = f"sqlite:///{tmp_path / 'gateway.db'}"
    secrets = Secrets.from_settings(Settings(database_url=db))
    keyfile = tmp_path / "gateway.key"
    with pytest.raises(Undecryptable, match=r"gateway\.key does not exist"):
        secrets.decrypt(PREFIX + "x")
    assert not keyfile.exists()  # made only when a key must be encrypted
    with caplog.at_level(logging.WARNING, logger="paragate.secrets"):
        stored = secrets.encrypt(UPSTREAM_KEY)
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert [str(keyfile) in m for m in caplog.messages] == [True]
    assert keyfile.read_text().splitlines()[-1] not in caplog.text
    # another process (the gateway beside the CLI) finds the same file
    assert Secrets.for_database(db).decrypt(stored) == UPSTREAM_KEY
    assert [p.name for p in tmp_path.iterdir()] == ["gateway.key"]  # nothing left over


def test_with_no_key_postgresql_refuses_to_store_an_upstream_key(
        pg_store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """Its gateways share one database from several machines: a key file on one of them
    would be a key the others lack. Plaintext keys from before are still served."""
    pg_store.secrets = Secrets.for_database(str(pg_store.url))
    with pytest.raises(NoSecretKey):
        pg_store.secrets.encrypt(UPSTREAM_KEY)
    with pytest.raises(InvalidRequest) as refused:
        add_model(pg_store, "m", "http://h/v1", "ok", upstream_api_key=UPSTREAM_KEY)
    assert refused.value.code == "secret_key_missing"
    assert refused.value.param == "upstream_api_key"
    assert refused.value.message == (
        "Storing an upstream API key needs a secret key to encrypt it: set "
        "PARAGATE_SECRET_KEY or secret_key_file (docs/configuration.md).")
    add_model(pg_store, "m", "http://h/v1", "ok")  # without a key: fine
    _write_plaintext(pg_store, "m", UPSTREAM_KEY)
    with caplog.at_level(logging.WARNING, logger="paragate.store"):
        pg_store.migrate()
    assert "2 upstream API key(s) are stored unencrypted" in caplog.text
    assert _raw(pg_store) == [UPSTREAM_KEY, UPSTREAM_KEY]
    (replica,) = pg_store.changes(0).replicas
    assert replica.upstream_api_key == UPSTREAM_KEY


# -- the store ----------------------------------------------------------------------------


def test_the_database_never_holds_an_upstream_key_in_plaintext(store: Store) -> None:
    add_model(store, "m", "http://h/v1", "ok", upstream_api_key=UPSTREAM_KEY)
    replica = control.replicas.create(store, CLI, "m", url="http://h2/v1",
                                      upstream_api_key=OTHER_KEY)
    control.models.create(store, CLI, "bare", upstream_url="http://h3/v1")
    raw = _raw(store)  # models m, bare; replicas m's first, m's second, bare's
    assert raw[1] is None and raw[4] is None
    stored = [v for v in raw if v is not None]
    assert len(stored) == 3 and all(v.startswith(PREFIX) for v in stored)
    assert not any(UPSTREAM_KEY in v or OTHER_KEY in v for v in stored)
    assert [store.secrets.decrypt(v) for v in stored] == [UPSTREAM_KEY] * 2 + [OTHER_KEY]
    # what the gateway loads: decrypted
    loaded = {r.id: r.upstream_api_key for r in store.changes(0).replicas}
    assert loaded[replica.id] == OTHER_KEY and UPSTREAM_KEY in loaded.values()
    # updates: a new key encrypted; the same key again is no change; unset is None
    control.replicas.update(store, CLI, "m", replica.id, upstream_api_key=UPSTREAM_KEY)
    audited = len(_audit(store))
    control.replicas.update(store, CLI, "m", replica.id, upstream_api_key=UPSTREAM_KEY)
    assert len(_audit(store)) == audited  # no change, so no audit row
    control.replicas.update(store, CLI, "m", replica.id, upstream_api_key=None)
    control.models.update(store, CLI, "bare", upstream_api_key=OTHER_KEY)
    raw = _raw(store)
    assert raw[3] is None and raw[1] is not None and raw[4] is not None
    assert store.secrets.decrypt(raw[1]) == store.secrets.decrypt(raw[4]) == OTHER_KEY
    # the audit rows say whether a key is set, never which
    text = str(_audit(store))
    assert UPSTREAM_KEY not in text and OTHER_KEY not in text and PREFIX not in text
    keyed = [c["upstream_api_key"] for c in _audit(store) if "upstream_api_key" in c]
    assert keyed and all(v in ([None, "<secret>"], ["<secret>", "<secret>"],
                               ["<secret>", None], [None, None]) for v in keyed)


def _audit(store: Store) -> list[dict[str, list[object]]]:
    with store.read() as conn:
        return list(conn.execute(select(audit_log.c.changes).order_by(audit_log.c.id))
                    .scalars())


def _write_plaintext(store: Store, model: str, key: str) -> None:
    """An upstream key written as the store wrote it before encryption (``key`` with
    the ``sk-`` prefix, written so that test_log_leaks sees it)."""
    assert key.startswith("sk-")
    with store.engine.begin() as conn:
        model_id = conn.execute(select(models.c.id).where(models.c.name == model)).scalar_one()
        conn.execute(update(models).where(models.c.id == model_id).values(
            upstream_api_key=f"sk-{key[3:]}"))
        conn.execute(update(model_replicas).where(model_replicas.c.model_id == model_id)
                     .values(upstream_api_key=f"sk-{key[3:]}"))


def test_keys_stored_in_plaintext_before_are_encrypted_at_the_next_start(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    add_model(store, "m", "http://h/v1", "ok")
    _write_plaintext(store, "m", UPSTREAM_KEY)
    (before,) = store.changes(0).replicas
    assert before.upstream_api_key == UPSTREAM_KEY  # served as it is meanwhile
    version = store.version()
    with caplog.at_level(logging.INFO, logger="paragate.store"):
        store.migrate()
    assert "encrypted 2 upstream API key(s) that were stored in plaintext" in caplog.text
    raw = _raw(store)
    assert all(v is not None and v.startswith(PREFIX) and UPSTREAM_KEY not in v
               for v in raw)
    assert store.version() == version  # not a config change: the gateways' keys hold
    (after,) = store.changes(0).replicas
    assert after.upstream_api_key == UPSTREAM_KEY
    store.migrate()  # idempotent
    assert _raw(store) == raw


def test_rotation(store: Store) -> None:
    """Add a new key first, rotate, remove the old: everything still decrypts."""
    old_key = generate_key()
    old = store.secrets = Secrets([old_key])
    add_model(store, "m", "http://h/v1", "ok", upstream_api_key=UPSTREAM_KEY)
    control.replicas.create(store, CLI, "m", url="http://h2/v1", upstream_api_key=OTHER_KEY)
    control.models.delete(store, CLI, "m")  # deleted rows' keys are rotated too
    add_model(store, "n", "http://h/v1", "ok")
    _write_plaintext(store, "n", "sk-plain")  # one from before encryption
    new_key = generate_key()
    store.secrets = Secrets([new_key, old_key])
    done = control.secrets.rotate(store, CLI)
    assert (done.keys, done.plaintext) == (5, 2)
    only_new = Secrets([new_key])
    assert sorted(only_new.decrypt(v) for v in _raw(store) if v is not None) == sorted(
        [UPSTREAM_KEY, UPSTREAM_KEY, OTHER_KEY, "sk-plain", "sk-plain"])
    with pytest.raises(Undecryptable):
        old.decrypt(next(v for v in _raw(store) if v is not None))
    with store.read() as conn:
        (changes,) = conn.execute(select(audit_log.c.changes).where(
            audit_log.c.action == "secrets.rotate")).scalars()
    assert changes == {"keys": [None, 5], "plaintext": [None, 2]}
    # a key none of the configured ones decrypts: nothing changes, the row is named
    store.secrets = Secrets([generate_key()])
    before = _raw(store)
    with pytest.raises(Conflict, match=r"^The upstream API key of model 'm' cannot be "
                       r"decrypted \(none of the secret keys"):
        control.secrets.rotate(store, CLI)
    assert _raw(store) == before


# -- the gateway --------------------------------------------------------------------------


@pytest.fixture
async def recording() -> AsyncIterator[FakeVLLM]:
    server = await FakeVLLM(record_headers=True).start()
    yield server
    await server.stop()


async def test_requests_carry_the_decrypted_key(store: Store, tmp_path: Path,
                                               recording: FakeVLLM) -> None:
    add_model(store, "m", recording.base_url, "ok", upstream_api_key=UPSTREAM_KEY)
    add_model(store, "bare", recording.base_url, "ok")
    key, _ = make_key(store, "k")
    admin, _ = make_key(store, "root", is_admin=True)
    gw = build_gateway(store, tmp_path, health_interval=0)
    await gw.start()
    try:
        transport = httpx.ASGITransport(app=App(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            assert (await post(api, key, model="m", prompt="x", max_tokens=2)
                    ).status_code == 200
            assert recording.headers[-1].getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
            assert (await post(api, key, model="bare", prompt="x", max_tokens=2)
                    ).status_code == 200
            assert "Authorization" not in recording.headers[-1]
            # changed through the API: the new key at once, encrypted at rest
            r = await api.patch("/api/v2/models/m", headers=auth(admin),
                                json={"upstream_api_key": OTHER_KEY})
            assert r.status_code == 200 and OTHER_KEY not in r.text
            assert r.json()["has_upstream_api_key"] is True
            assert (await post(api, key, model="m", prompt="x", max_tokens=2)
                    ).status_code == 200
            assert recording.headers[-1]["Authorization"] == f"Bearer {OTHER_KEY}"
            for path in ("/api/v2/models?all=true", "/api/v2/models/m/replicas",
                         "/api/v2/audit-log?limit=100"):
                r = await api.get(path, headers=auth(admin))
                assert r.status_code == 200, r.text
                assert UPSTREAM_KEY not in r.text and OTHER_KEY not in r.text
                assert PREFIX not in r.text
    finally:
        await gw.stop()
    assert not any(UPSTREAM_KEY in v or OTHER_KEY in v for v in _raw(store) if v)


async def test_a_wrong_secret_key_stops_the_start_naming_the_replicas(
        store: Store, tmp_path: Path) -> None:
    add_model(store, "m", "http://127.0.0.1:9/v1", "ok", upstream_api_key=UPSTREAM_KEY)
    replica_id = control.replicas.list_(store, CLI, "m")[1][0].id
    store.secrets = Secrets([generate_key()], source="PARAGATE_SECRET_KEY")
    gw = build_gateway(store, tmp_path)
    with pytest.raises(Undecryptable) as refused:
        await gw.start()
    gw.refresh_thread.close()
    message = str(refused.value)
    assert message.startswith(
        f"cannot decrypt the upstream API key of replica {replica_id} of model 'm' (none of "
        "the secret keys (PARAGATE_SECRET_KEY) encrypted it). Start with the secret key")
    assert UPSTREAM_KEY not in message and PREFIX not in message


async def test_a_key_that_cannot_be_decrypted_later_puts_its_replica_out_of_service(
        store: Store, tmp_path: Path, recording: FakeVLLM,
        caplog: pytest.LogCaptureFixture) -> None:
    """A running gateway that meets a key it cannot decrypt (written by a gateway with
    another secret key) logs it, naming the replica, and answers 503 for it: not a 500,
    and never the ciphertext sent as a Bearer."""
    add_model(store, "m", recording.base_url, "ok", upstream_api_key=UPSTREAM_KEY)
    add_model(store, "other", recording.base_url, "ok")
    key, _ = make_key(store, "k")
    gw = build_gateway(store, tmp_path, health_interval=0)
    await gw.start()
    try:
        elsewhere = Store(str(store.url), secrets=Secrets([generate_key()]))
        try:
            control.models.update(elsewhere, CLI, "m", upstream_api_key=OTHER_KEY)
        finally:
            elsewhere.close()
        with caplog.at_level(logging.ERROR):
            await gw.refresher.refresh()
        transport = httpx.ASGITransport(app=App(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            r = await post(api, key, model="m", prompt="x", max_tokens=2)
            assert_envelope(r, 503, "upstream_misconfigured", type_="upstream_error")
            assert (await post(api, key, model="other", prompt="x", max_tokens=2)
                    ).status_code == 200
        assert [h.get("Authorization") for h in recording.headers] == [None]
        logged = [m for m in caplog.messages if "cannot decrypt" in m]
        assert len(logged) == 1 and "of model 'm'" in logged[0]
        assert any("out of service" in m and "decrypts its upstream API key" in m
                   for m in caplog.messages)
    finally:
        await gw.stop()


# -- the CLI ------------------------------------------------------------------------------


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}
    environ.update({"PARAGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}", **env})
    return subprocess.run([sys.executable, "-m", "paragate", *args], capture_output=True,
                          text=True, env=environ, timeout=60, cwd=tmp_path)


def test_the_cli_rotates_from_the_generated_key_to_a_configured_one(tmp_path: Path) -> None:
    added = _cli(tmp_path, "models", "add", "m", "--upstream", "http://h/v1",
                 "--upstream-api-key", UPSTREAM_KEY)
    assert added.returncode == 0, added.stderr
    keyfile = tmp_path / "p.key"
    assert "generated the secret key" in added.stderr and str(keyfile) in added.stderr
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    generated = keyfile.read_text().splitlines()[-1]
    new = _cli(tmp_path, "secrets", "generate").stdout.strip()
    Fernet(new.encode())  # a key
    rotated = _cli(tmp_path, "secrets", "rotate", PARAGATE_SECRET_KEY=f"{new},{generated}")
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout == "re-encrypted 2 upstream API key(s) with the first secret key\n"
    store = Store(f"sqlite:///{tmp_path / 'p.db'}", secrets=Secrets([new]))
    try:
        assert [store.secrets.decrypt(v) for v in _raw(store) if v] == [UPSTREAM_KEY] * 2
    finally:
        store.close()
    listed = _cli(tmp_path, "models", "list", PARAGATE_SECRET_KEY=new)
    assert listed.returncode == 0 and UPSTREAM_KEY not in listed.stdout + listed.stderr
    wrong = _cli(tmp_path, "secrets", "rotate", PARAGATE_SECRET_KEY=generated)
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert wrong.stderr.startswith("Error: The upstream API key of model 'm' cannot be "
                                   "decrypted")
    assert "Traceback" not in wrong.stderr
    bad = _cli(tmp_path, "models", "list", PARAGATE_SECRET_KEY="nope")
    assert bad.returncode == 1 and "secret_key: key 1 is not a Fernet key" in bad.stderr
    assert "nope" not in bad.stderr
    helped = _cli(tmp_path, "secrets", "--help").stdout
    assert "paragate secrets rotate" in helped and "remove the old key" in helped


def test_cryptography_and_multipart_are_not_loaded_at_start() -> None:
    """They cost a worker 13 MB (the idle target is < 80 MB): loaded when first used."""
    code = ("import sys, paragate.cli, paragate.app, paragate.gateway, paragate.secrets; "
            "from paragate.secrets import Secrets, generate_key; "
            "Secrets.from_settings(__import__('paragate.config').config.Settings("
            "secret_key=generate_key())); "
            "print(sorted(m for m in ('cryptography', 'python_multipart') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
