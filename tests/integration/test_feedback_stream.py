"""Chat answers streamed (``POST /api/chat/stream``, feedback/chat_stream.py) through the rollout engine's
``on_step``: the streamed pieces add up to the stored answer, streaming does not change what is sampled, the
stop button cuts the answer where it is (stored, ratable), and refusals are the unstreamed route's."""

import json
import threading

import pytest
from fastapi.testclient import TestClient

from chatrlhf.config import GenerationConfig, ModelLoadConfig
from chatrlhf.feedback.answerer import Answerer
from chatrlhf.feedback.app import NAME_COOKIE, create_app
from chatrlhf.feedback.store import FeedbackStore
from chatrlhf.models import TINY_MODEL

BASE = "http://127.0.0.1:8000"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def answerer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATRLHF_CACHE", str(tmp_path_factory.mktemp("cache")))
        # No EOS can end these answers early enough to matter: 48 tokens of the random model, sampled.
        yield Answerer([ModelLoadConfig(TINY_MODEL)], GenerationConfig(max_new_tokens=48, temperature=1.0))


@pytest.fixture
def store(tmp_path):
    return FeedbackStore(tmp_path / "feedback.db")


@pytest.fixture
def client(store, answerer):
    with TestClient(create_app(store, answerer), base_url=BASE, follow_redirects=False) as c:
        c.cookies.set(NAME_COOKIE, "ann")
        yield c


def events(response) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a text/event-stream body."""
    out = []
    for frame in response.text.split("\n\n"):
        if frame.strip():
            lines = dict(line.split(": ", 1) for line in frame.splitlines())
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_streamed_pieces_add_up_to_the_stored_answer_and_equal_the_unstreamed_one(client, store):
    with client.stream("POST", "/api/chat/stream", json={"messages": HELLO, "seed": 11}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        r.read()
    got = events(r)
    names = [name for name, _ in got]
    assert names[0] == "start" and names[-1] == "done" and set(names[1:-1]) == {"delta"}
    assert len(names) > 3  # several pieces, not the whole answer at once
    done = got[-1][1]
    assert "".join(data["text"] for name, data in got if name == "delta").strip() == done["text"]
    assert store.answer(done["answer_id"])["text"] == done["text"] and done["stopped"] is False
    assert done["html"].startswith("<p>") or done["text"] == ""
    plain = client.post("/api/chat", json={"messages": HELLO, "seed": 11}).json()
    assert plain["text"] == done["text"] and plain["finished"] == done["finished"]  # the same sample


def test_stop_cuts_the_answer_and_stores_it_as_written(client, store, answerer):
    """The stop arrives while the model writes: a gate holds generation after the 3rd piece of text until the
    stop was posted, so the cut point is known."""
    gate, original = threading.Event(), answerer.answer
    pieces = []

    def gated(model, messages, seed, *, on_text=None, stop=None):
        def on_piece(text):
            pieces.append(text)
            on_text(text)
            if len(pieces) == 3:
                assert gate.wait(30)
        return original(model, messages, seed, on_text=on_piece, stop=stop)

    answerer.answer = gated
    try:
        with client.stream("POST", "/api/chat/stream", json={"messages": HELLO, "seed": 5}) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first == "event: start"
            stream_id = json.loads(next(lines).removeprefix("data: "))["stream_id"]
            assert next(line for line in lines if line.startswith("event: ")) == "event: delta"  # the model writes
            assert client.post("/api/chat/stop", json={"stream_id": stream_id}).json() == {"stopped": True}
            gate.set()
            rest = "\n".join(lines)
    finally:
        answerer.answer = original
    done = json.loads(rest.split("event: done\ndata: ")[1].split("\n")[0])  # pieces 2 and 3 came before it
    assert done["stopped"] is True and done["finished"] is False
    assert done["text"] == "".join(pieces).strip()  # exactly what was written before the stop
    stored = store.answer(done["answer_id"])
    assert stored["finished"] == 0 and json.loads(stored["settings"])["stopped"] is True
    full = client.post("/api/chat", json={"messages": HELLO, "seed": 5}).json()["text"]
    assert full.startswith(done["text"]) and len(full) > len(done["text"])
    # A stopped answer is an answer: it can be rated.
    rating = {"request_id": "stopped-answer-1", "answer_id": done["answer_id"], "overall": 2, "consistency": 3,
              "engagingness": 2, "safety": 5, "relevance": 3}
    assert client.post("/rate", json=rating).status_code == 201
    # The stream is over: its id stops nothing now.
    assert client.post("/api/chat/stop", json={"stream_id": stream_id}).status_code == 404


@pytest.mark.parametrize(("body", "message"), [
    ({"model": 3}, "model must be an index 0..0, got 3"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "field 'messages'"),
])
def test_stream_refusals_come_before_the_stream(client, store, body, message):
    r = client.post("/api/chat/stream", json={"messages": HELLO, **body})
    assert r.status_code == 400 and message in r.json()["error"]
    assert store.progress()["chat_answers"] == 0


def test_stop_refuses_an_unknown_stream(client):
    for body in ({"stream_id": "0" * 32}, {"stream_id": 5}, {}):
        r = client.post("/api/chat/stop", json=body)
        assert r.status_code == 404 and "stream_id" in r.json()["error"]


def test_a_stop_while_waiting_for_the_model_stores_nothing(client, store, answerer):
    """Another answer holds the model (its lock): the stop comes first, so this one never starts."""
    with answerer._lock:
        with client.stream("POST", "/api/chat/stream", json={"messages": HELLO, "seed": 5}) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: start"
            stream_id = json.loads(next(lines).removeprefix("data: "))["stream_id"]
            assert client.post("/api/chat/stop", json={"stream_id": stream_id}).status_code == 200
            answerer._lock.release()
            try:
                rest = [line for line in lines if line.startswith("event: ")]
            finally:
                answerer._lock.acquire()
    assert rest == ["event: stopped"] and store.progress()["chat_answers"] == 0
