"""``chatrlhf serve-reward``: a real server process scored through ``RemoteSource`` over real HTTP, its security
(token on every request, 413), its refusals, and the command's validation."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from chatrlhf.cli import main
from chatrlhf.config import ConfigError
from chatrlhf.rewards.contract import RewardBatch
from chatrlhf.rewards.factory import build_reward_source
from chatrlhf.rewards.remote import TOKEN_ENV, RemoteRewardError, RemoteSource
from chatrlhf.rewards.server import BadRequest, ServeRewardConfig, read_request

TOKEN = "serve-reward-test-token"
slow = pytest.mark.slow
RULES = """
from chatrlhf.rewards import batched


@batched
def words(prompts, completions, **columns):
    # "nan" scores NaN: the server must refuse to send it (422)
    return [float("nan") if c == "nan" else float(len(c.split())) for c in completions]
"""


def batch(responses, meta=None) -> RewardBatch:
    n = len(responses)
    empty = torch.zeros(n, 0, dtype=torch.long)
    prompts = [[{"role": "user", "content": f"Question {i}: why is the sky blue?"}] for i in range(n)]
    return RewardBatch(empty, empty, prompts, list(responses), [True] * n, meta or [{"harmful": False}] * n)


@pytest.fixture(scope="module")
def spec(tiny_model, tmp_path_factory) -> str:
    """A reward model (re-encoding texts: the server has no policy tokenizer), the rater and a batched function."""
    from chatrlhf.models import RewardModel, load_tokenizer

    root = tmp_path_factory.mktemp("serve_reward")
    torch.manual_seed(0)
    RewardModel.from_causal_lm(str(tiny_model), head_init_std=0.3).save_pretrained(
        root / "rm", tokenizer=load_tokenizer(tiny_model))
    (root / "rules.py").write_text(RULES)
    return f"{root / 'rm'} + 0.5*rater + 0.1*{root / 'rules.py'}:words"


@pytest.fixture(scope="module")
def server(spec, tmp_path_factory):
    """``chatrlhf serve-reward`` on a free port with a token and a 4 KiB body limit; yields its /score URL."""
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(TOKEN_ENV, None)
    cmd = [sys.executable, "-m", "chatrlhf.cli", "serve-reward", "--reward", spec, "--port", "0", "--token", TOKEN,
           "--max_request_bytes", "4096", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        while not (url := next((w for w in log.read_text().split() if w.endswith("/score")), None)):
            assert proc.poll() is None, f"serve-reward exited with {proc.returncode}:\n{log.read_text()}"
            assert time.time() < deadline, f"serve-reward printed no URL:\n{log.read_text()}"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(url: str, body: bytes, token: str | None = TOKEN, method: str = "POST") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=body if method == "POST" else None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ------------------------------------------------------------------------------------------ the server
@slow
def test_remote_scores_equal_local_ones(server, spec, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    b = batch(["Sunlight scatters off air molecules, and blue light scatters most.", "I do not know.", ""])
    remote = RemoteSource(server)(b)
    local = build_reward_source(spec, None, normalize_sources=False)(b)  # what the server computes, in-process
    # Same float32 ops on the same CPU, one thread each; floats cross JSON exactly (shortest round-trip repr).
    torch.testing.assert_close(remote, local, rtol=1e-6, atol=1e-6)
    assert remote.shape == (3,) and torch.isfinite(remote).all()
    # ... and as one term of a trainer's own ensemble
    ens = build_reward_source(f"2*{server} + 1*rater", None, normalize_sources=False)
    rater = build_reward_source("rater", None)(b)
    torch.testing.assert_close(ens(b), (2 * local.double() + rater.double()).float(), rtol=1e-6, atol=1e-6)


@slow
def test_token_on_every_request(server, monkeypatch):
    health = server.removesuffix("/score") + "/health"
    assert post(health, b"", method="GET")[0] == 200
    status, reply = post(health, b"", token=None, method="GET")
    assert status == 401 and "access token" in reply["error"]
    status, reply = post(server, json.dumps({"prompts": [], "responses": []}).encode(), token=None)
    assert status == 401
    with pytest.raises(RemoteRewardError, match=rf"HTTP 401: the server needs an access token; set {TOKEN_ENV}"):
        RemoteSource(server)(batch(["x"]))
    monkeypatch.setenv(TOKEN_ENV, "a-wrong-token-of-length")
    with pytest.raises(RemoteRewardError, match=rf"HTTP 401: the server refused the token in {TOKEN_ENV}"):
        RemoteSource(server)(batch(["x"]))


@slow
def test_health_names_the_reward(server, spec):
    status, reply = post(server.removesuffix("/score") + "/health", b"", method="GET")
    # the ensemble's name: each term's weight and source name (chatrlhf.rewards.ensemble.EnsembleSource)
    assert status == 200 and reply["status"] == "ok"
    assert reply["reward"].endswith(f" + 0.5*rater + 0.1*fn:{spec.rpartition(' + 0.1*')[2]}")


@slow
def test_body_over_the_limit_is_413(server, monkeypatch):
    status, reply = post(server, b'{"responses": ["' + b"x" * 5000 + b'"]}')
    assert status == 413 and "over 4096 bytes (--max_request_bytes)" in reply["error"]
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(RemoteRewardError, match=r"HTTP 413: the batch \(\d+ bytes\) is over the server's limit"):
        RemoteSource(server)(batch(["many words " * 500]))


@slow
def test_refusals_name_the_problem(server, monkeypatch):
    status, reply = post(server, b'{"responses": ["a"], "prompts": [[{"role": "user"}]]}')
    assert status == 400 and reply["error"].startswith("prompts[0] must be a non-empty list of")
    status, reply = post(server, b'{"responses": ["a"], "prompts": [[{"role": "user", "content": "q"}]], "x": 1}')
    assert (status, reply["error"]) == (400, 'unknown field "x"; the fields are prompts, responses, finished, meta')
    assert post(server.removesuffix("/score") + "/nope", b"", method="GET")[0] == 404
    assert post(server, b"", method="GET")[0] == 405
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(RemoteRewardError, match=r"HTTP 422: .*words returned nan \(float\) for row 1 of the batch"):
        RemoteSource(server)(batch(["fine", "nan"]))
    assert RemoteSource(server)(batch([])).shape == (0,)


# ------------------------------------------------------------------------------- request and validation
def test_read_request_defaults_and_errors():
    ok = read_request(b'{"prompts": [[{"role": "user", "content": "q"}]], "responses": ["a"]}', 8)
    assert (ok.finished, ok.meta, ok.sequences.shape) == ([True], [{}], (1, 0))
    cases = {
        b"[]": "request body must be a JSON object",
        b"{": "request body is not JSON",
        b'{"responses": "a"}': '"responses" must be a list, got str',
        b'{"responses": ["a"]}': '"prompts" is missing; the fields are prompts, responses, finished, meta',
        b'{"responses": ["a"], "prompts": []}': '"prompts" has 0 entries but "responses" has 1',
        b'{"responses": ["a", "b", "c"]}': "3 answers in one request, over the server's --max_batch 2",
        b'{"responses": ["a"], "prompts": [[{"role": "user", "content": "q"}]], "finished": [1]}':
            "finished[0] must be true or false, got int",
        b'{"responses": ["a"], "prompts": [[{"role": "user", "content": "q"}]], "meta": [null]}':
            "meta[0] must be an object, got NoneType",
        b'{"responses": ["a"], "responses": ["b"]}': "key 'responses' appears twice",
    }
    for body, message in cases.items():
        with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("(", r"\(")):
            read_request(body, 2)


@pytest.mark.parametrize("change, message", [
    ({"port": 70000}, r"--port must be in 0\.\.65535, got 70000"),
    ({"max_request_bytes": 10}, "--max_request_bytes must be >= 1024, got 10"),
    ({"max_batch": 0}, "--max_batch must be >= 1, got 0"),
    ({"device": "gpu"}, "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"token": "short"}, "--token must be at least 16 characters"),
    ({"host": "0.0.0.0"}, rf"--host 0\.0\.0\.0 is not a loopback address, so the server needs an access token: "
                          rf"set --token \(or {TOKEN_ENV}\)"),
])
def test_validate_names_the_flag(change, message, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=message):
        ServeRewardConfig(reward="rater", **change).validate()
    ServeRewardConfig(reward="rater", host="0.0.0.0", token=TOKEN).validate()
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    ServeRewardConfig(reward="rater", host="0.0.0.0").validate()  # the variable is a token too


def test_command_refuses_before_serving(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["serve-reward", "--reward", "rater", "--host", "0.0.0.0"]) == 2
    assert "chatrlhf serve-reward: error: --host 0.0.0.0 is not a loopback address" in capsys.readouterr().err
    assert main(["serve-reward"]) == 2
    assert "chatrlhf serve-reward: error: no reward given: set --reward to" in capsys.readouterr().err
    assert main(["serve-reward", "--reward", str(Path("no/such/dir"))]) == 2
    assert "reward model dir no/such/dir not found" in capsys.readouterr().err
