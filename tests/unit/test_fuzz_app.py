"""Fuzzing the feedback app's JSON endpoints: whatever the body, the answer is never a 500, and a refusal is
the documented ``{"error": str}``.

Each of the 7 JSON endpoints (POST /api/chat, /api/chat/stop, /compare, /rate, /undo, /queue, /annotator) gets
``EXAMPLES`` = 200 JSON-ish bodies (hypothesis ``recursive`` values under the endpoints' real field names
and random ones, written with NaN/Infinity, lone surrogates, huge integers, deep lists) and 80 random byte
strings, i.e. 1,960 requests in all (about 15 s on one core). ``derandomize=True``: the same examples every
run, so a failure reproduces; no example database is written.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatrlhf.feedback.app import NAME_COOKIE, create_app
from chatrlhf.feedback.store import FeedbackStore

EXAMPLES = 200
BYTE_EXAMPLES = 80
ENDPOINTS = ["/api/chat", "/api/chat/stop", "/compare", "/rate", "/undo", "/queue", "/annotator"]
FIELDS = ["model", "messages", "seed", "request_id", "prompt_id", "answer_a", "answer_b", "choice", "comment",
          "annotator", "answer_id", "overall", "consistency", "engagingness", "safety", "relevance", "prompts",
          "next", "role", "content", "kind", "stream_id"]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class FakeAnswerer:
    """``Answerer``'s interface without a model; it seeds a real torch generator, as ``Answerer`` does."""

    names = ["fake-model"]

    def answer(self, model: int, messages: list[dict], seed: int):
        torch.Generator().manual_seed(seed)
        return SimpleNamespace(text="an answer", finished=True, model=self.names[model], settings={"seed": seed})

    def pair(self, prompt_id: int, messages: list[dict]):
        return self.answer(0, messages, prompt_id), self.answer(0, messages, prompt_id + 1)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One app for every example (hypothesis runs many examples per test; a function fixture would be shared
    anyway). A queued prompt with its pair gives ids 1 and 2 for the fuzzer to hit."""
    store = FeedbackStore(tmp_path_factory.mktemp("fuzz") / "feedback.db")
    store.add_prompts([[{"role": "user", "content": "q"}]], source="fuzz")
    store.add_answer(1, "m", "a", True, {}, slot="a")
    store.add_answer(1, "m", "b", True, {}, slot="b")
    with TestClient(create_app(store, FakeAnswerer()), base_url="http://127.0.0.1:8000", follow_redirects=False) as c:
        c.cookies.set(NAME_COOKIE, "fuzzer")
        yield c


texts = st.text(max_size=12) | st.sampled_from(["a", "b", "tie", "user", "assistant", "system", "request-0001", ""]) | \
    st.integers(0xD800, 0xDFFF).map(chr)  # a lone surrogate
numbers = st.integers(-3, 6) | st.integers() | st.integers(2**63 - 2, 2**64 + 1) | st.floats(allow_nan=True)
scalars = st.none() | st.booleans() | numbers | texts
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=5), max_leaves=24)
deep = st.integers(90, 3000).map(lambda n: "[" * n + "]" * n)  # around the nesting limit and far past it
VALID = {  # a body each endpoint accepts: one field changed reaches the checks behind the first one
    "/api/chat": {"messages": [{"role": "user", "content": "q"}], "seed": 1},
    "/compare": {"request_id": "request-0001", "prompt_id": 1, "answer_a": 1, "answer_b": 2, "choice": "a"},
    "/rate": {"request_id": "request-0001", "answer_id": 1, "overall": 4, "consistency": 4, "engagingness": 4,
              "safety": 4, "relevance": 4},
    "/api/chat/stop": {"stream_id": "0" * 32},
    "/undo": {"kind": "compare", "request_id": "request-0002"},
    "/queue": {"prompts": ["q"]},
    "/annotator": {"annotator": "fuzzer", "next": "/"},
}


def bodies(path: str):
    """JSON text: a valid body with one field changed, random fields, any value, or deep nesting."""
    one_changed = st.tuples(st.sampled_from(FIELDS), values).map(lambda kv: {**VALID[path], kv[0]: kv[1]})
    objects = one_changed | st.dictionaries(st.sampled_from(FIELDS), values, max_size=8) | values
    return objects.map(lambda v: json.dumps(v, allow_nan=True)) | deep


def check(response) -> None:
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        body = response.json()
        assert list(body) == ["error"] and isinstance(body["error"], str), body


@pytest.mark.parametrize("path", ENDPOINTS)
def test_json_bodies_never_crash(client, path):
    @FUZZ
    @given(body=bodies(path))
    def run(body: str):  # ASCII: json.dumps writes a lone surrogate as its escape, "\\ud800"
        check(client.post(path, content=body.encode(), headers={"content-type": "application/json"}))

    run()


@pytest.mark.parametrize("path", ENDPOINTS)
def test_random_bytes_never_crash(client, path):
    @settings(FUZZ, max_examples=BYTE_EXAMPLES)
    @given(body=st.binary(max_size=64) | st.binary(max_size=8).map(lambda b: b'{"seed": ' + b))
    def run(body: bytes):
        check(client.post(path, content=body, headers={"content-type": "application/json"}))

    run()
