"""``chatrlhf serve`` settings: config validation, which hosts are loopback, where the access token comes
from, and the repeated ``--model`` / ``--prompts`` flags."""

import pytest

from chatrlhf.cli import _collect_repeated, parse
from chatrlhf.config import ConfigError, GenerationConfig, ModelLoadConfig
from chatrlhf.feedback.serve import TOKEN_ENV, ServeConfig, is_loopback, resolve_token

TOKEN = "a-token-of-sixteen+"


def test_default_config_is_valid():
    ServeConfig().validate()
    ServeConfig(model=ModelLoadConfig("a"), compare_with="b", port=0, generation=GenerationConfig(temperature=0, top_p=1.0),
                max_request_bytes=1024, token=TOKEN).validate()


@pytest.mark.parametrize(("change", "message"), [
    ({"model": ModelLoadConfig("")}, "--model.name_or_path is empty"),
    ({"compare_with": ""}, "--compare_with is empty"),
    ({"port": -1}, r"--port must be in 0\.\.65535, got -1"),
    ({"port": 65536}, r"--port must be in 0\.\.65535, got 65536"),
    ({"generation": GenerationConfig(max_new_tokens=0)}, "--generation.max_new_tokens must be >= 1, got 0"),
    ({"generation": GenerationConfig(temperature=-0.1)}, r"--generation.temperature must be >= 0 \(0: greedy\), got -0.1"),
    ({"generation": GenerationConfig(top_p=0.0)}, r"--generation.top_p must be in \(0, 1\], got 0.0"),
    ({"generation": GenerationConfig(top_p=1.5)}, r"--generation.top_p must be in \(0, 1\], got 1.5"),
    ({"max_request_bytes": 1023}, "--max_request_bytes must be >= 1024, got 1023"),
    ({"token": "x" * 15}, "--token must be at least 16 characters"),
])
def test_validate_names_the_flag(change, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**change).validate()


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True), ("127.0.0.2", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.2", False), ("10.0.0.1", False), ("example.com", False),
    ("localhost.example.com", False), ("", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_resolve_token_loopback_needs_none(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert resolve_token(ServeConfig(host="127.0.0.1")) is None
    assert resolve_token(ServeConfig(host="localhost")) is None


def test_resolve_token_makes_a_random_one_off_loopback(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    first, second = resolve_token(ServeConfig(host="0.0.0.0")), resolve_token(ServeConfig(host="0.0.0.0"))
    assert len(first) >= 24 and len(second) >= 24
    assert first != second
    assert resolve_token(ServeConfig(host="example.com")) is not None  # a name may resolve to any interface


def test_resolve_token_from_env_and_flag(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "token-from-the-environment")
    assert resolve_token(ServeConfig(host="127.0.0.1")) == "token-from-the-environment"
    assert resolve_token(ServeConfig(host="0.0.0.0")) == "token-from-the-environment"
    assert resolve_token(ServeConfig(host="0.0.0.0", token=TOKEN)) == TOKEN  # --token wins


def test_resolve_token_refuses_a_short_env_token(monkeypatch):
    # --token is checked by validate(); the environment variable must meet the same bar.
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(ConfigError, match=f"{TOKEN_ENV} must be at least 16 characters"):
        resolve_token(ServeConfig(host="0.0.0.0"))


def test_collect_repeated_flags():
    assert _collect_repeated(["serve", "--model", "A", "--port", "1", "--model=B"], ("--model",)) == [
        "serve", "--model", '["A", "B"]', "--port", "1"]
    assert _collect_repeated(["serve", "--model", "[A, B]"], ("--model",)) == ["serve", "--model", "[A, B]"]
    assert _collect_repeated(["serve", "--port", "1"], ("--model",)) == ["serve", "--port", "1"]


@pytest.mark.parametrize(("argv", "models", "prompts"), [
    (["--model.name_or_path", "A", "--compare_with", "B", "--prompts", "p1", "--prompts", "p2"], ["A", "B"],
     ["p1", "p2"]),
    (["--prompts", "[p1, p2]"], ["smollm2-135m-instruct", None], ["p1", "p2"]),
    (["--model.name_or_path", "A"], ["A", None], []),
    (["--model.name_or_path=A", "--port", "9000", "--compare_with=B", "--prompts", "demo:prompts_eval"], ["A", "B"],
     ["demo:prompts_eval"]),
    ([], ["smollm2-135m-instruct", None], []),
])
def test_parse_serve_models_and_prompts(argv, models, prompts):
    command, cfg = parse(["serve", *argv])
    assert command == "serve" and isinstance(cfg, ServeConfig)
    assert ([cfg.model.name_or_path, cfg.compare_with], cfg.prompts) == (models, prompts)
    assert cfg.port == (9000 if "9000" in argv else 8000)
