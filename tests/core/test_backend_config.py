"""The proxy and webhooks settings: defaults, bad values, the secret's redaction; the
webhook signature against the Standard Webhooks library."""

from __future__ import annotations

import base64
import time

import pytest
import standardwebhooks

from shardchat.backend.signing import secret_key, signed_headers
from shardchat.configload import load_config
from shardchat.core.config import Config, to_toml
from shardchat.core.errors import ConfigError

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("proxy.connect_url", "ftp://x", "http:// or https:// URL"),
        ("proxy.publish_url", "localhost:8000", "http:// or https:// URL"),
        ("proxy.timeout", 0, "a number > 0"),
        ("proxy.connections", 0, "integer from 1 to 1024"),
        ("overload.proxy", 0, "an integer >= 1"),
        ("webhooks.url", "http://", "http:// or https:// URL"),
        ("webhooks.secret", "plain-secret", "whsec_"),
        ("webhooks.secret", "whsec_" + base64.b64encode(b"short").decode(), "24 to 64 bytes"),
        ("webhooks.events", ["connect", "typing"], "a list of connect"),
        ("webhooks.events", "connect", "a list of connect"),
        ("webhooks.max_age", -1, "a number > 0"),
        ("webhooks.queue", 0, "an integer >= 1"),
        ("webhooks.batch", 0, "integer from 1 to 10000"),
        ("webhooks.timeout", "soon", "a number > 0"),
        ("webhooks.vacated_grace", -0.5, "a number >= 0"),
    ],
)
def test_bad_values_name_key_and_allowed(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides={key: value})
    assert key in str(info.value) and words in str(info.value)
    if key == "webhooks.secret":
        assert str(value) not in str(info.value)  # never printed


def test_the_connect_proxy_answers_within_the_handshake_deadline() -> None:
    url = {"proxy.connect_url": "http://127.0.0.1:1/c"}
    with pytest.raises(ConfigError, match="handshake"):
        load_config(environ={}, overrides={**url, "proxy.timeout": 5})
    assert load_config(environ={}, overrides={**url, "proxy.timeout": 4.5}).proxy.timeout == 4.5
    # The publish proxy alone may wait longer.
    publish = {"proxy.publish_url": "http://127.0.0.1:1/p", "proxy.timeout": 10}
    assert load_config(environ={}, overrides=publish).proxy.timeout == 10


def test_webhooks_need_a_secret_and_it_is_redacted() -> None:
    with pytest.raises(ConfigError, match="webhooks.secret"):
        load_config(environ={}, overrides={"webhooks.url": "http://127.0.0.1:1/h"})
    config = load_config(
        environ={"SHARDCHAT_WEBHOOKS_SECRET": SECRET},
        overrides={"webhooks.url": "http://127.0.0.1:1/h", "webhooks.events": ["message"]},
    )
    assert config.webhooks.secret == SECRET and config.webhooks.events == ("message",)
    assert SECRET not in to_toml(config)
    assert Config().proxy.timeout == 1.0 and not Config().proxy.connect_url


def test_signature_verifies_with_standardwebhooks() -> None:
    body = b'[{"id":"evt_1","type":"connect"}]'
    now = int(time.time())
    headers = dict(signed_headers(secret_key(SECRET), "msg_1", now, body))
    assert standardwebhooks.Webhook(SECRET).verify(body, headers) == [
        {"id": "evt_1", "type": "connect"}
    ]
    tampered = dict(signed_headers(secret_key(SECRET), "msg_1", now, body + b" "))
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(body, tampered)
