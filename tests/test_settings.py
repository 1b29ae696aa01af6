"""Settings: read once from the flags and the environment, flag first, one table of variables."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from broker.topics import Topics
from fedmq.settings import (
    DEFAULT_MAX_INLINE_BYTES,
    SHARED_DATA,
    VARIABLES,
    Settings,
    SettingsError,
    load_settings,
    variables_table,
)

ROOT = Path(__file__).resolve().parents[1]

# One value per variable, and the setting it must become.
ENVIRONMENT: dict[str, tuple[str, Any]] = {
    "FEDMQ_HOME": ("/srv/fedmq", Path("/srv/fedmq")),
    "FEDMQ_BROKER_URL": ("amqp://u:p@rabbit:5672/v", "amqp://u:p@rabbit:5672/v"),
    "FEDMQ_STORE_URL": ("s3://bucket/prefix", "s3://bucket/prefix"),
    "FEDMQ_DB_URL": ("postgresql://db/fedmq", "postgresql://db/fedmq"),
    "FEDMQ_SERVER_URL": ("http://service:8080", "http://service:8080"),
    "FEDMQ_NAMESPACE": ("tenant-a", "tenant-a"),
    "FEDMQ_WORKER_GROUP": ("pool-1", "pool-1"),
    "FEDMQ_KEYS": ("/srv/keys", Path("/srv/keys")),
    "FEDMQ_DATA_DIR": ("/srv/data", Path("/srv/data")),
    "FEDMQ_ADMIN_TOKEN": ("admin-secret", "admin-secret"),
    "FEDMQ_VIEWER_TOKEN": ("viewer-secret", "viewer-secret"),
    "FEDMQ_ENROLLMENT_TOKEN": ("enroll-secret", "enroll-secret"),
    "FEDMQ_SIGNING_KEY": ("0123456789abcdef-key", b"0123456789abcdef-key"),
    "FEDMQ_MAX_INLINE_BYTES": ("4096", 4096),
    "FEDMQ_BROKER_ACCESS_URL": (
        "rabbitmq-http://a:b@rabbit:15672",
        "rabbitmq-http://a:b@rabbit:15672",
    ),
    "FEDMQ_CONFIGS_DIR": ("/srv/configs", Path("/srv/configs")),
    "FEDMQ_MAX_MODEL_PARAMETERS": ("1000", 1000),
}


def test_every_setting_has_one_variable_and_every_variable_one_setting() -> None:
    variables = [v.name for v in VARIABLES]
    settings = [v.setting for v in VARIABLES]

    assert len(set(variables)) == len(variables) and len(set(settings)) == len(settings)
    assert set(settings) == {f.name for f in dataclasses.fields(Settings)}
    assert set(variables) == set(ENVIRONMENT)


@pytest.mark.parametrize("name", sorted(ENVIRONMENT))
def test_each_variable_fills_its_setting(name: str) -> None:
    text, expected = ENVIRONMENT[name]
    setting = next(v.setting for v in VARIABLES if v.name == name)

    settings = load_settings({}, {name: text})

    assert getattr(settings, setting) == expected
    others = {f.name for f in dataclasses.fields(Settings)} - {setting, "home"}
    defaults = Settings()
    assert all(getattr(settings, other) == getattr(defaults, other) for other in others)


def test_nothing_set_gives_the_embedded_defaults(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)

    settings = load_settings({}, {})

    home = tmp_path / "fedmq-data"
    assert settings.home == home
    assert settings.broker is None and settings.broker_url == "mqtt://127.0.0.1:1883"
    assert settings.store is None and settings.store_url == (home / "store").as_uri()
    assert settings.db_url == f"sqlite:///{home / 'fedmq.db'}"
    assert settings.server_url == "http://127.0.0.1:8080"
    assert settings.topics == Topics("fedmq")
    assert settings.updates_group == "fedmq-aggregators"
    assert settings.key_folder == home / "keys"
    assert settings.data_dirs == (SHARED_DATA,)
    assert settings.max_inline_bytes == DEFAULT_MAX_INLINE_BYTES
    assert settings.admin_token is None and settings.signing_key is None


def test_a_flag_beats_its_variable_and_a_variable_beats_the_default() -> None:
    env = {
        "FEDMQ_BROKER_URL": "mqtt://env:1883",
        "FEDMQ_STORE_URL": "file:///env/store",
        "FEDMQ_NAMESPACE": "from-env",
        "FEDMQ_KEYS": "/env/keys",
        "FEDMQ_WORKER_GROUP": "env-group",
    }
    flags = argparse.Namespace(
        broker="mqtt://flag:1883", store=None, namespace="from-flag", keys=Path("/flag/keys")
    )

    settings = load_settings(flags, env)

    assert settings.broker == "mqtt://flag:1883"  # flag over variable
    assert settings.store == "file:///env/store"  # no flag given: the variable
    assert settings.namespace == "from-flag"
    assert settings.keys == Path("/flag/keys")
    assert settings.worker_group == "env-group"  # this command has no --group
    assert settings.db is None  # neither: the default applies
    assert load_settings({"group": "flag-group"}, env).updates_group == "flag-group"


def test_an_empty_variable_counts_as_unset() -> None:
    settings = load_settings({}, {"FEDMQ_BROKER_URL": "", "FEDMQ_MAX_INLINE_BYTES": ""})

    assert settings.broker is None
    assert settings.max_inline_bytes == DEFAULT_MAX_INLINE_BYTES


def test_the_namespace_names_the_topics_and_the_default_group() -> None:
    settings = load_settings({}, {"FEDMQ_NAMESPACE": "tenant-b"})

    assert settings.topics == Topics("tenant-b")
    assert settings.updates_group == Topics("tenant-b").updates_group


def test_the_data_folder_is_searched_before_the_shared_one() -> None:
    settings = load_settings({}, {"FEDMQ_DATA_DIR": "/srv/data"})

    assert settings.data_dirs == (Path("/srv/data"), SHARED_DATA)
    assert not SHARED_DATA.is_absolute()  # no machine's path in the code


def test_narrower_tokens_are_tried_first_then_the_admin_token() -> None:
    admin_only = load_settings({}, {"FEDMQ_ADMIN_TOKEN": "a"})
    narrow = load_settings(
        {}, {"FEDMQ_ADMIN_TOKEN": "a", "FEDMQ_VIEWER_TOKEN": "v", "FEDMQ_ENROLLMENT_TOKEN": "e"}
    )

    assert admin_only.viewer_credential == "a" and admin_only.enrollment_credential == "a"
    assert narrow.viewer_credential == "v" and narrow.enrollment_credential == "e"
    assert load_settings({}, {}).viewer_credential is None


def test_secrets_stay_out_of_the_repr() -> None:
    settings = load_settings({}, {k: v for k, (v, _) in ENVIRONMENT.items()})

    shown = repr(settings)

    for secret in ("admin-secret", "viewer-secret", "enroll-secret", "0123456789abcdef", "a:b@"):
        assert secret not in shown


def test_every_unusable_value_is_listed() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({}, {"FEDMQ_MAX_INLINE_BYTES": "1MiB", "FEDMQ_MAX_MODEL_PARAMETERS": "many"})
    assert len(caught.value.problems) == 2
    assert "FEDMQ_MAX_INLINE_BYTES='1MiB'" in caught.value.problems[0]

    with pytest.raises(SettingsError) as caught:
        load_settings({"namespace": "a/b"}, {"FEDMQ_SIGNING_KEY": "short"})
    assert len(caught.value.problems) == 2
    assert "namespace 'a/b'" in caught.value.problems[0]
    assert "signing key" in caught.value.problems[1]


def test_settings_are_frozen() -> None:
    settings = Settings()

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.namespace = "other"  # type: ignore[misc]


def test_the_operations_guide_prints_the_one_table() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()

    assert variables_table() in guide


def test_every_command_that_uses_the_bus_takes_its_namespace_as_a_flag() -> None:
    from fedmq.cli import build_parser

    parser = build_parser()
    lines = {
        "server": [],
        "worker": [],
        "fleet": ["--devices", "1"],
        "bridge": ["--region", "mqtt://region:1883", "--name", "eu"],
    }
    for command, required in lines.items():
        args = parser.parse_args([command, *required, "--namespace", "lab-7"])

        assert load_settings(args, {}).namespace == "lab-7", command
