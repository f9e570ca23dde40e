"""``RemoteSource`` against a tiny real HTTP server (``http.server`` in a thread): the contract it sends, the
retries, and the one-line error of each way a server can fail. No mock of the transport."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from chatrlhf.rewards.contract import RewardBatch
from chatrlhf.rewards.factory import SPEC_FORMS, build_reward_source, build_single_source
from chatrlhf.rewards.remote import (
    TOKEN_ENV,
    RemoteRewardError,
    RemoteSource,
    is_remote_spec,
    parse_remote_spec,
)
from chatrlhf.rewards.sources import RaterSource

TOKEN = "a-token-of-sixteen+"


class Scripted(BaseHTTPRequestHandler):
    """Answers each POST with the next scripted reply: (status, body bytes, extra headers), or "drop" (close
    the connection without an answer) or ("sleep", seconds, reply). Records every request it got."""

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.server.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        reply = self.server.replies.pop(0) if self.server.replies else self.server.default(body)
        if reply == "drop":
            self.close_connection = True
            return
        if reply[0] == "sleep":
            time.sleep(reply[1])
            reply = reply[2]
        status, data, headers = (*reply, {}) if len(reply) == 2 else reply
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet test output
        pass


def word_counts(body: bytes):
    """The default reply: each response's word count as its score."""
    return 200, json.dumps({"scores": [len(r.split()) for r in json.loads(body)["responses"]]}).encode()


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    httpd.daemon_threads = True
    httpd.seen, httpd.replies, httpd.default = [], [], word_counts
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/score"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def batch(responses, meta=None, finished=None) -> RewardBatch:
    """A text batch (no token ids: the remote source sends texts only)."""
    n = len(responses)
    empty = torch.zeros(n, 0, dtype=torch.long)
    return RewardBatch(empty, empty, [[{"role": "user", "content": f"q{i}"}] for i in range(n)], list(responses),
                       finished or [True] * n, meta if meta is not None else [])


def fast(spec: str) -> RemoteSource:
    return RemoteSource(spec, backoff_s=0.01)


# ------------------------------------------------------------------------------------------- contract
def test_the_request_and_the_scores(server):
    out = fast(server.url)(batch(["one two", "a b c", ""], meta=[{"id": 1}, {}, {"k": [1]}], finished=[True, False, True]))
    assert out.dtype == torch.float32 and out.tolist() == [2.0, 3.0, 0.0]
    (request,) = server.seen
    assert request["path"] == "/score"
    assert request["headers"]["Content-Type"] == "application/json" and "Authorization" not in request["headers"]
    assert json.loads(request["body"]) == {
        "prompts": [[{"role": "user", "content": "q0"}], [{"role": "user", "content": "q1"}],
                    [{"role": "user", "content": "q2"}]],
        "responses": ["one two", "a b c", ""], "finished": [True, False, True], "meta": [{"id": 1}, {}, {"k": [1]}]}


def test_token_from_the_environment_is_sent(server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    fast(server.url)(batch(["x"]))
    assert server.seen[0]["headers"]["Authorization"] == f"Bearer {TOKEN}"


def test_empty_batch_sends_nothing(server):
    assert fast(server.url)(batch([])).shape == (0,) and server.seen == []


def test_spec_options_are_read_and_not_sent(server):
    source = fast(server.url + "?timeout_s=5&keep=1&tries=2")
    assert (source.timeout_s, source.tries, source.url) == (5.0, 2, server.url + "?keep=1")
    source(batch(["x"]))
    assert server.seen[0]["path"] == "/score?keep=1"
    assert parse_remote_spec("https://example.com/r") == ("https://example.com/r", 30.0, 3)


@pytest.mark.parametrize("spec, message", [
    ("http:///score", r"names no host; write http://HOST:PORT/PATH"),
    ("http://h:99999/score", r"'http://h:99999/score': Port out of range"),
    ("http://h:1/s?timeout_s=0", r"timeout_s='0' must be a number in \[0.001, 86400\]"),
    ("http://h:1/s?timeout_s=nan", r"timeout_s='nan' must be a number"),
    ("http://h:1/s?tries=0", r"tries='0' must be a number in \[1, 10\]"),
    ("http://h:1/s?tries=1.5", r"tries='1.5' must be a whole number in \[1, 10\]"),
])
def test_bad_specs_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        RemoteSource(spec)


def test_factory_builds_it_alone_and_in_an_ensemble(server):
    assert is_remote_spec(server.url) and is_remote_spec("https://x/y") and not is_remote_spec("rater")
    assert "http://HOST:PORT/PATH" in SPEC_FORMS
    assert isinstance(build_single_source(server.url, None), RemoteSource)
    ens = build_reward_source(f"0.5*{server.url} + 0.5*rater", None, normalize_sources=False)
    assert ens.names == ["remote", "rater"]
    b = batch(["Paris is the capital of France.", "no"])
    rater = RaterSource()(b)
    # 0.5 * word count + 0.5 * the rater's overall score, summed in float64 then cast
    expected = (0.5 * torch.tensor([6.0, 1.0], dtype=torch.float64) + 0.5 * rater.double()).float()
    assert torch.equal(ens(b), expected)


# -------------------------------------------------------------------------------------------- retries
def test_two_failures_then_success(server):
    server.replies = [(503, b'{"error": "busy"}'), "drop"]
    started = time.monotonic()
    assert RemoteSource(server.url, backoff_s=0.05)(batch(["a b"])).tolist() == [2.0]
    assert len(server.seen) == 3
    assert time.monotonic() - started >= 0.05 + 0.1  # waits of backoff_s, then twice that


def test_retries_run_out_with_the_last_failure(server):
    server.replies = [(500, b'{"error": "first"}'), (502, b'{"error": "out of memory"}')]
    with pytest.raises(RemoteRewardError, match=rf"reward server {server.url}: HTTP 502: out of memory \(tried 2 times, "
                                                r"30 s timeout each; \?tries=N and \?timeout_s=SECONDS"):
        fast(server.url + "?tries=2")(batch(["x"]))
    assert len(server.seen) == 2


def test_refused_connection():
    with socket.socket() as s:  # a port nobody listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RemoteRewardError, match=rf"reward server {url}: connection refused: is `chatrlhf serve-reward` "
                                                rf"running at {url}\? \(tried 3 times"):
        fast(url)(batch(["x"]))


def test_timeout(server):
    server.replies = [("sleep", 1.0, (200, b'{"scores": [1]}'))]
    with pytest.raises(RemoteRewardError, match=r"no answer within 0.2 s \(tried 1 times"):
        fast(server.url + "?timeout_s=0.2&tries=1")(batch(["x"]))


# ------------------------------------------------------------------------------------- refusals, bad replies
def test_401_is_not_retried_and_says_what_to_set(server, monkeypatch):
    server.replies = [(401, b'{"error": "missing token"}')] * 2
    with pytest.raises(RemoteRewardError, match=rf"{server.url}: HTTP 401: the server needs an access token; set "
                                                rf"{TOKEN_ENV} to the server's --token"):
        fast(server.url)(batch(["x"]))
    assert len(server.seen) == 1
    monkeypatch.setenv(TOKEN_ENV, "wrong-token-but-long")
    with pytest.raises(RemoteRewardError, match=rf"HTTP 401: the server refused the token in {TOKEN_ENV}"):
        fast(server.url)(batch(["x"]))


def test_other_refusals(server):
    server.replies = [(413, b'{"error": "request body over 1024 bytes (--max_request_bytes)"}'),
                      (400, b'{"error": "responses[0] must be text"}'),
                      (302, b"", {"Location": "http://elsewhere/score"})]
    with pytest.raises(RemoteRewardError, match=r"HTTP 413: the batch \(\d+ bytes\) is over the server's limit "
                                                r"\(request body over 1024 bytes"):
        fast(server.url)(batch(["x"]))
    with pytest.raises(RemoteRewardError, match=r"HTTP 400: responses\[0\] must be text"):
        fast(server.url)(batch(["x"]))
    with pytest.raises(RemoteRewardError, match=r"HTTP 302: redirects are not followed .* point --reward at "
                                                r"http://elsewhere/score"):
        fast(server.url)(batch(["x"]))
    assert len(server.seen) == 3  # none retried, the redirect not followed


@pytest.mark.parametrize("reply, message", [
    (b"<html>oops</html>", r"the response is not JSON \(Expecting value: .*\); it starts '<html>oops</html>'"),
    (b'{"score": [1, 2]}', r"the response has no \"scores\" list \(got \{\"score\": \[1, 2\]\}\)"),
    (b'[1, 2]', r"the response has no \"scores\" list"),
    (b'{"scores": [1, 2, 3]}', r"3 scores came back for 2 answers; the server must return one score per answer"),
    (b'{"scores": [1]}', r"1 scores came back for 2 answers"),
    (b'{"scores": [1, NaN]}', r"the response: 'NaN' is not a JSON number"),
    (b'{"scores": [1, 1e999]}', r"the response, field 'scores\[1\]': inf is not a finite number"),
    (b'{"scores": [1, "2"]}', r"scores\[1\] is \"2\", not a finite number"),
    (b'{"scores": [true, 2]}', r"scores\[0\] is true, not a finite number"),
    (b'{"scores": [1, null]}', r"scores\[1\] is null, not a finite number"),
])
def test_malformed_replies(server, reply, message):
    server.replies = [(200, reply)]
    with pytest.raises(RemoteRewardError, match=rf"reward server {server.url}.*{message}"):
        fast(server.url)(batch(["a", "b"]))
    assert len(server.seen) == 1  # a malformed answer is not retried


def test_meta_that_json_cannot_hold(server):
    with pytest.raises(ValueError, match=r"the batch cannot be sent as JSON \(Out of range float values"):
        fast(server.url)(batch(["x"], meta=[{"weight": float("nan")}]))
    assert server.seen == []
