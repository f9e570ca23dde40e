"""Hostile requests to the feedback app (``chatrlhf serve``): each one gets the error contract of
docs/feedback.md, never a 500 or a traceback, and writes nothing.

Every case of ``CASES`` is sent twice, as a script (``Accept: application/json``: the answer must be
exactly ``{"error": str}``) and as a browser (``Accept: text/html``: the error page, with the title that
fits, unless the request itself is JSON or under ``/api/``). Either way the status is the case's 4xx, the
message holds the case's fragment, no "Traceback" is in the body, the security headers are on, and the
database is byte-for-byte what it was (a dump of every table).

A fake answerer stands in for the model; it seeds a real ``torch.Generator`` as ``Answerer`` does, so a
seed the generator cannot take would fail here as it fails in the server.
"""

from __future__ import annotations

import html
import json
import logging
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from chatrlhf.feedback.app import NAME_COOKIE, create_app
from chatrlhf.feedback.security import HEADERS
from chatrlhf.feedback.store import FeedbackStore

BASE = "http://127.0.0.1:8000"
TOKEN = "hostile-test-token-0123456789"
JSON_CT = {"content-type": "application/json"}
USER = [{"role": "user", "content": "q"}]
INTERNAL = "internal error; the server log has the details"


class FakeAnswerer:
    """``Answerer``'s interface without a model: the answer names its seed."""

    names = ["fake-model"]

    def __init__(self, fail: Exception | None = None):
        self.fail = fail

    def answer(self, model: int, messages: list[dict], seed: int):
        if self.fail is not None:
            raise self.fail
        torch.Generator().manual_seed(seed)  # what Answerer does with it: out of range raises here
        return SimpleNamespace(text=f"answer with seed {seed}", finished=True, model=self.names[model],
                               settings={"seed": seed})

    def pair(self, prompt_id: int, messages: list[dict]):
        return self.answer(0, messages, prompt_id), self.answer(0, messages, prompt_id + 1)


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    """A queued prompt (id 1) with its pair (answers 1 and 2): ids a hostile request could aim at."""
    store = FeedbackStore(tmp_path / "feedback.db")
    store.add_prompts([USER], source="test.jsonl")
    store.add_answer(1, "m", "answer a", True, {}, slot="a")
    store.add_answer(1, "m", "answer b", True, {}, slot="b")
    return store


def client_for(store, answerer=None, **kwargs) -> TestClient:
    app = create_app(store, answerer or FakeAnswerer(), **kwargs)
    return TestClient(app, base_url=BASE, follow_redirects=False)


def dump(store) -> list[str]:
    with closing(sqlite3.connect(store.path)) as con:
        return list(con.iterdump())


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def obj(**fields) -> bytes:
    return json.dumps(fields).encode()


COMPARE = {"request_id": "request-0001", "prompt_id": 1, "answer_a": 1, "answer_b": 2, "choice": "a", "annotator": "ann"}
RATE = {"request_id": "request-0001", "answer_id": 1, "overall": 4, "consistency": 4, "engagingness": 4, "safety": 4,
        "relevance": 4, "annotator": "ann"}


def form(base: dict, **change) -> dict:
    """A form's text fields: ``base`` with ``change`` (None drops a field)."""
    return {k: str(v) for k, v in {**base, **change}.items() if v is not None}


@dataclass
class Case:
    id: str
    method: str
    path: str
    status: int
    fragment: str  # in the error message
    content: bytes | None = None  # with Content-Type: application/json unless headers say otherwise
    data: dict | list | None = None  # a form
    files: dict | None = None  # a multipart upload
    headers: dict = field(default_factory=dict)
    named: bool = False  # send the annotator cookie
    chunked: bool = False  # send ``content`` in pieces, without a Content-Length
    app: dict = field(default_factory=dict)  # create_app keyword arguments


def chat(**fields) -> bytes:
    return obj(**{"messages": USER, **fields})


CASES = [
    # ---- bodies that are not the JSON they claim to be
    Case("json-syntax", "POST", "/api/chat", 400, "not valid JSON", content=b'{"model": 0, "messages": '),
    Case("json-empty", "POST", "/compare", 400, "not valid JSON", content=b""),
    Case("json-not-object", "POST", "/annotator", 400, "must be a JSON object", content=b'["ann"]'),
    Case("json-bad-utf8", "POST", "/queue", 400, "byte 0xff is not UTF-8", content=b'{"prompts": ["\xff"]}'),
    Case("json-dup-key", "POST", "/api/chat", 400, "key 'seed' appears twice",
         content=b'{"messages": [{"role": "user", "content": "q"}], "seed": 1, "seed": 2}'),
    Case("json-dup-key-nested", "POST", "/queue", 400, "key 'content' appears twice",
         content=b'{"prompts": [[{"role": "user", "content": "a", "content": "b"}]]}'),
    Case("json-deep-100000", "POST", "/queue", 400, "nested deeper than 100 levels",
         content=b'{"prompts": ' + deep(100_000) + b"}"),
    Case("json-deep-101", "POST", "/rate", 400, "nested deeper than 100 levels",
         content=b'{"comment": ' + deep(101) + b"}"),
    Case("json-huge-seed", "POST", "/api/chat", 400, "field 'seed': integer 18446744073709551616 is beyond 64 bits",
         content=chat(seed=2**64)),
    Case("json-huge-id", "POST", "/compare", 400, "field 'prompt_id': integer 100000000000000000000000... is beyond 64 bits",
         content=obj(**{**COMPARE, "prompt_id": 10**30})),
    Case("json-surrogate", "POST", "/rate", 400, "field 'comment': holds a lone UTF-16 surrogate",
         content=obj(**RATE).replace(b'"annotator"', b'"comment": "\\ud800", "annotator"')),
    Case("json-nan", "POST", "/rate", 400, "'NaN' is not a JSON number", content=obj(**RATE).replace(b"4,", b"NaN,", 1)),
    Case("json-infinity", "POST", "/api/chat", 400, "'Infinity' is not a JSON number",
         content=b'{"messages": "q", "seed": Infinity}'),
    Case("json-1e999", "POST", "/rate", 400, "field 'overall': inf is not a finite number",
         content=obj(**RATE).replace(b"4,", b"1e999,", 1)),
    # ---- wrong types and ranges, field by field
    Case("chat-model-huge", "POST", "/api/chat", 400, "model must be an index 0..0, got 1099511627776",
         content=chat(model=2**40)),
    Case("chat-messages-dict", "POST", "/api/chat", 400, "field 'messages'", content=chat(messages={"role": "user"})),
    Case("chat-content-int", "POST", "/api/chat", 400, "field 'messages'",
         content=chat(messages=[{"role": "user", "content": 5}])),
    Case("chat-seed-negative", "POST", "/api/chat", 400, "seed must be in 0..2**63 - 1", content=chat(seed=-1)),
    Case("chat-seed-null", "POST", "/api/chat", 400, "seed must be an integer, got None", content=chat(seed=None)),
    Case("chat-seed-list", "POST", "/api/chat", 400, "seed must be an integer, got [1]", content=chat(seed=[1])),
    Case("compare-missing-fields", "POST", "/compare", 400, "prompt_id must be an integer id, got None", content=b"{}"),
    Case("compare-id-list", "POST", "/compare", 400, "answer_a must be an integer id, got [1]",
         content=obj(**{**COMPARE, "answer_a": [1]})),
    Case("compare-id-zero", "POST", "/compare", 400, "prompt_id must be an integer id from 1 to 2**63 - 1, got 0",
         content=obj(**{**COMPARE, "prompt_id": 0})),
    Case("compare-id-negative", "POST", "/compare", 400, "answer_b must be an integer id from 1 to 2**63 - 1, got -3",
         content=obj(**{**COMPARE, "answer_b": -3})),
    Case("compare-choice-list", "POST", "/compare", 400, "choice must be one of a, b, tie, got ['a']",
         content=obj(**{**COMPARE, "choice": ["a"]})),
    Case("compare-request-id-int", "POST", "/compare", 400, "request_id must be a client-made id",
         content=obj(**{**COMPARE, "request_id": 12345678})),
    Case("compare-comment-dict", "POST", "/compare", 400, "comment must be text",
         content=obj(**{**COMPARE, "comment": {"a": 1}})),
    Case("compare-annotator-int", "POST", "/compare", 400, "annotator must be a name",
         content=obj(**{**COMPARE, "annotator": 0})),
    Case("rate-score-list", "POST", "/rate", 400, "safety must be an integer from 1 to 5, got [4]",
         content=obj(**{**RATE, "safety": [4]})),
    Case("rate-score-float-text", "POST", "/rate", 400, "overall must be an integer from 1 to 5, got '4.0'",
         content=obj(**{**RATE, "overall": "4.0"})),
    Case("rate-id-max-plus-one", "POST", "/rate", 400, "answer_id must be an integer id from 1 to 2**63 - 1",
         content=obj(**{**RATE, "answer_id": "9223372036854775808"})),
    Case("rate-missing-scores", "POST", "/rate", 400, "overall must be an integer from 1 to 5, got None",
         content=obj(request_id="request-0001", answer_id=1, annotator="ann")),
    Case("queue-prompts-dict", "POST", "/queue", 400, "prompts must be a non-empty list", content=obj(prompts={"a": 1})),
    Case("queue-prompt-null", "POST", "/queue", 400, "field 'prompt 2'", content=obj(prompts=["fine", None])),
    Case("annotator-int", "POST", "/annotator", 400, "annotator must be a name", content=obj(annotator=5)),
    # ---- bad query and path parameters
    Case("query-id-text", "GET", "/compare?prompt_id=abc", 400, "prompt_id: must be an integer, got 'abc'", named=True),
    Case("query-id-huge", "GET", "/compare?prompt_id=99999999999999999999999", 400,
         "prompt_id: must be <= 9223372036854775807, got '99999999999999999999999'", named=True),
    Case("query-id-zero", "GET", "/rate?answer_id=0", 400, "answer_id: must be >= 1, got '0'", named=True),
    Case("query-id-float", "GET", "/rate?answer_id=1.5", 400, "answer_id: must be an integer, got '1.5'"),
    Case("query-id-unknown", "GET", "/rate?answer_id=9223372036854775807", 404,
         "answer_id 9223372036854775807 does not exist", named=True),
    Case("query-margin-empty", "GET", "/export?min_margin=", 400, "min_margin: must be a number, got ''"),
    Case("query-agreement-text", "GET", "/export/pairs.jsonl?min_agreement=most", 400,
         "min_agreement: must be a number, got 'most'"),
    Case("query-margin-overflow", "GET", "/export?min_margin=1e999", 400, "min_margin must be a finite number"),
    Case("query-saved-text", "GET", "/compare?saved=yes", 400, "saved: must be an integer, got 'yes'"),
    # ---- routes and methods that do not exist
    Case("route-unknown", "GET", "/admin", 404, "/admin does not exist"),
    Case("route-unknown-api", "GET", "/api/users", 404, "/api/users does not exist"),
    Case("route-unknown-static", "GET", "/static/missing.js", 404, "/static/missing.js does not exist"),
    Case("route-unknown-export", "GET", "/export/votes.jsonl", 404, "no export named 'votes'"),
    Case("method-get-chat", "GET", "/api/chat", 405, "GET is not allowed on /api/chat (use POST)"),
    Case("method-put-compare", "PUT", "/compare", 405, "PUT is not allowed on /compare", content=obj(**COMPARE)),
    Case("method-delete-queue", "DELETE", "/queue", 405, "DELETE is not allowed on /queue"),
    Case("method-post-healthz", "POST", "/healthz", 405, "POST is not allowed on /healthz"),
    Case("method-post-static", "POST", "/static/app.js", 405, "POST is not allowed on /static/app.js"),
    # ---- content types
    Case("ct-chat-as-form", "POST", "/api/chat", 400, "send the body as JSON", data={"messages": "q"}),
    Case("ct-text-plain", "POST", "/compare", 400, "prompt_id must be an integer id, got None",
         content=obj(**COMPARE), headers={"content-type": "text/plain"}),
    Case("ct-multipart-no-boundary", "POST", "/rate", 400, "the form could not be read",
         content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
    Case("ct-queue-xml", "POST", "/queue", 400, "file: choose a prompt file", content=b"<prompts/>",
         headers={"content-type": "application/xml"}),
    # ---- sizes
    Case("size-over-cap", "POST", "/queue", 413, "request body over 2097152 bytes",
         content=obj(prompts=["x" * (2 << 20)])),
    Case("size-chunked-over-cap", "POST", "/rate", 413, "request body over 1024 bytes", chunked=True,
         content=obj(**RATE, comment="x" * 2000), app={"max_request_bytes": 1024}),
    Case("size-length-not-a-number", "POST", "/annotator", 400, "Content-Length 'many' is not a byte count",
         headers={"content-length": "many"}),
    Case("size-upload-over-cap", "POST", "/queue", 413, "request body over 1024 bytes",
         files={"file": ("p.jsonl", b'{"prompt": "q"}\n' * 100, "application/octet-stream")}, app={"max_request_bytes": 1024}),
    # ---- bad form values
    Case("form-id-underscore", "POST", "/compare", 400, "prompt_id must be an integer id, got '1_0'",
         data=form(COMPARE, prompt_id="1_0")),
    Case("form-id-huge", "POST", "/compare", 400, "answer_a must be an integer id from 1 to 2**63 - 1",
         data=form(COMPARE, answer_a="9" * 5000)),
    Case("form-id-arabic-digit", "POST", "/rate", 400, "answer_id must be an integer id, got '\u0663'",
         data=form(RATE, answer_id="\u0663")),
    Case("form-score-huge", "POST", "/rate", 400, "relevance must be an integer from 1 to 5",
         data=form(RATE, relevance="4" * 5000)),
    Case("form-field-twice", "POST", "/compare", 400, "form field 'choice' is given twice",
         data={**form(COMPARE), "choice": ["a", "b"]}),
    Case("form-file-in-rate", "POST", "/rate", 400, "form field 'comment' is a file", data=form(RATE),
         files={"comment": ("c.txt", b"x", "text/plain")}),
    Case("form-name-blank", "POST", "/annotator", 400, "annotator must be a name", data={"annotator": "  "}),
    Case("form-upload-suffix", "POST", "/queue", 400, "use a .jsonl, .json, .csv or .parquet file",
         files={"file": ("prompts.exe", b"MZ", "application/octet-stream")}),
    Case("form-upload-garbage", "POST", "/queue", 400, "p.jsonl", files={"file": ("p.jsonl", b"\xff\x00{", "x/y")}),
    # ---- the guard's refusals
    Case("guard-host", "GET", "/api/progress", 400, "Host 'evil.example' is not served", headers={"host": "evil.example"}),
    Case("guard-origin", "POST", "/queue", 403, "cross-site request refused", content=obj(prompts=["q"]),
         headers={"origin": "http://evil.example"}),
    Case("guard-origin-unparsable", "POST", "/annotator", 403, "cross-site request refused",
         data={"annotator": "ann"}, headers={"origin": "http://[::1"}),
    Case("guard-token", "POST", "/queue", 401, "missing or wrong access token", content=obj(prompts=["q"]),
         app={"token": TOKEN, "allowed_hosts": None}),
    Case("guard-token-page", "GET", "/rate?answer_id=1", 401, "missing or wrong access token",
         app={"token": TOKEN, "allowed_hosts": None}),
]


def send(client: TestClient, case: Case, accept: str):
    headers = {"accept": accept, **(JSON_CT if case.content is not None else {}), **case.headers}
    if case.named:
        client.cookies.set(NAME_COOKIE, "ann")
    content = case.content
    if case.chunked:
        content = (case.content[i:i + 256] for i in range(0, len(case.content), 256))
    return client.request(case.method, case.path, content=content, data=case.data, files=case.files, headers=headers)


def expects_json(case: Case, accept: str) -> bool:
    """The documented rule: JSON for a JSON body, an /api/ path or an Accept naming JSON."""
    content_type = {**(JSON_CT if case.content is not None else {}), **case.headers}.get("content-type", "")
    return content_type == "application/json" or case.path.startswith("/api/") or "application/json" in accept


def page_title(case: Case) -> str:
    """Titles from the brief: "Not saved" only for a refused write, "Not found" for a missing page."""
    if case.status == 401:
        return "Access token needed"
    if case.status in (404, 405) and case.id.startswith(("route-", "method-")):
        return "Not found" if case.status == 404 else "Method not allowed"
    if case.method != "GET":
        return "Not saved"
    return {404: "Not found", 403: "Refused"}.get(case.status, "Bad request")


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("accept", ["application/json", "text/html,application/xhtml+xml,*/*;q=0.8"],
                         ids=["json-client", "browser"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request(store, case, accept):
    before = dump(store)
    with client_for(store, **case.app) as client:
        r = send(client, case, accept)
    assert r.status_code == case.status, r.text[:500]
    assert "Traceback" not in r.text and 'File "' not in r.text
    for name, value in HEADERS.items():
        assert r.headers.get(name) == value, name
    if expects_json(case, accept):
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert list(body) == ["error"] and isinstance(body["error"], str) and "\n" not in body["error"]
        message = body["error"]
    else:
        assert r.headers["content-type"].startswith("text/html")
        assert re.search(r"<title>(.*?) - chatrlhf feedback</title>", r.text).group(1) == page_title(case)
        message = html.unescape(re.search(r'<p class="error" id="error">(.*?)</p>', r.text, re.S).group(1))
        assert 'id="progress"' not in r.text  # an error page shows no data (it also answers the unauthorised)
    assert case.fragment in message
    assert dump(store) == before


# ---------------------------------------------------------------------------------- 500: the server's own fault
@pytest.mark.parametrize(("method", "path", "kwargs", "json_client"), [
    ("POST", "/api/chat", {"json": {"messages": USER}}, True),  # the chat's answer fails
    ("GET", "/compare?prompt_id=2", {"headers": {"accept": "text/html"}}, False),  # the missing pair's generation fails
], ids=["json-client", "browser"])
def test_an_uncaught_exception_is_a_bare_500_and_logged(store, caplog, method, path, kwargs, json_client):
    store.add_prompts([[{"role": "user", "content": "no pair yet"}]], source="x")  # prompt 2
    before = dump(store)
    with client_for(store, FakeAnswerer(fail=RuntimeError("secret detail of the crash"))) as client:
        client.cookies.set(NAME_COOKIE, "ann")
        with caplog.at_level(logging.ERROR, logger="chatrlhf.feedback"):
            r = client.request(method, path, **kwargs)
    assert r.status_code == 500
    assert "secret detail" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    for name, value in HEADERS.items():
        assert r.headers.get(name) == value, name
    if json_client:
        assert r.json() == {"error": INTERNAL}
    else:
        assert "<title>Server error - chatrlhf feedback</title>" in r.text and INTERNAL in r.text
    assert "secret detail of the crash" in caplog.text and "Traceback" in caplog.text  # the details: in the log
    assert dump(store) == before


# ---------------------------------------------------------------------------------- headers on every response
HEADER_TABLE = [
    ("home", "GET", "/", {}, 200),
    ("static file", "GET", "/static/style.css", {}, 200),
    ("healthz", "GET", "/healthz", {}, 200),
    ("redirect to the name form", "GET", "/compare", {}, 303),
    ("redirect after a form", "POST", "/annotator", {"data": {"annotator": "ann"}}, 303),
    ("json answer", "GET", "/api/progress", {}, 200),
    ("export file", "GET", "/export/pairs.jsonl", {}, 200),
    ("refusal", "POST", "/rate", {"json": {}}, 400),
    ("404", "GET", "/nowhere", {}, 404),
    ("405", "PATCH", "/rate", {}, 405),
    ("validation", "GET", "/rate?answer_id=x", {}, 400),
    ("413", "POST", "/queue", {"content": b"x" * (2 << 20) + b"x"}, 413),
    ("rebinding Host", "GET", "/", {"headers": {"host": "evil.example"}}, 400),
]


@pytest.mark.parametrize(("what", "method", "path", "kwargs", "status"), HEADER_TABLE, ids=[t[0] for t in HEADER_TABLE])
def test_security_headers_on_every_response(store, what, method, path, kwargs, status):
    with client_for(store) as client:
        r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text[:300]
    for name, value in HEADERS.items():
        assert r.headers.get(name) == value, (what, name)


def test_security_headers_with_a_token(store):
    with client_for(store, token=TOKEN, allowed_hosts=None) as client:
        no_token = client.get("/static/app.js")
        trade = client.get(f"/?token={TOKEN}")  # the token is traded for a cookie: a redirect
    assert (no_token.status_code, trade.status_code) == (401, 303)
    for r in (no_token, trade):
        assert all(r.headers.get(name) == value for name, value in HEADERS.items())
