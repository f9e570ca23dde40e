"""The feedback web app (``chatrlhf serve``) over HTTP: every route and its errors, the access token, the
Host and Origin checks, the body cap, the Content-Security-Policy and the escaping of model text.

One tiny random Llama answers the chats and fills missing pairs; pairs that tests compare or rate are
written straight into the store, so their texts are known."""

import html
import json
import re
import sqlite3
from contextlib import closing
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from chatrlhf.config import GenerationConfig, ModelLoadConfig
from chatrlhf.feedback.answerer import Answerer, PairWorker
from chatrlhf.feedback.app import NAME_COOKIE, create_app
from chatrlhf.feedback.schema import DIMENSIONS
from chatrlhf.feedback.security import TOKEN_COOKIE
from chatrlhf.feedback.store import FeedbackStore
from chatrlhf.models import TINY_MODEL

BASE = "http://127.0.0.1:8000"
TOKEN = "test-token-0123456789abcdef"
SCORES = {"overall": 4, "consistency": 5, "engagingness": 3, "safety": 5, "relevance": 2}
XSS_PROMPT = "<script>alert(1)</script><img src=x onerror=alert(2)>"
XSS_ANSWER = '<b onmouseover="alert(3)">bold</b><script src="//evil.example/x.js"></script>'


@pytest.fixture(scope="module")
def answerer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the built-in model is built into a private cache
        mp.setenv("CHATRLHF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield Answerer([ModelLoadConfig(TINY_MODEL)], GenerationConfig(max_new_tokens=16, temperature=0.7, top_p=0.9))


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    return FeedbackStore(tmp_path / "feedback.db")


def make_client(store, answerer, worker=None, **kwargs) -> TestClient:
    return TestClient(create_app(store, answerer, worker, **kwargs), base_url=BASE, follow_redirects=False)


@pytest.fixture
def client(store, answerer):
    with make_client(store, answerer) as c:
        yield c


@pytest.fixture
def named(client):
    """A client whose annotator cookie says 'ann'."""
    client.cookies.set(NAME_COOKIE, "ann")
    return client


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def queued_pair(store, text="question", a="answer a", b="answer b") -> tuple[int, int, int]:
    """A queued prompt with both answers of its pair; returns (prompt id, answer a id, answer b id)."""
    store.add_prompts([user(text)], source="test.jsonl")
    pid = store.prompt_id_for(user(text))
    return (pid, store.add_answer(pid, "m1", a, True, {"seed": 0}, slot="a"),
            store.add_answer(pid, "m2", b, False, {"seed": 1}, slot="b"))


def error(response, status: int) -> str:
    """The refusal's message after checking its status (JSON for JSON requests, the error page otherwise)."""
    assert response.status_code == status, response.text
    if response.headers["content-type"].startswith("application/json"):
        return response.json()["error"]
    return html.unescape(re.search(r'<p class="error" id="error">(.*?)</p>', response.text, re.S).group(1))


def count(store, table: str) -> int:
    with closing(sqlite3.connect(store.path)) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def comparison(pid, a, b, choice="a", request_id="request-0001", **extra) -> dict:
    return {"request_id": request_id, "prompt_id": pid, "answer_a": a, "answer_b": b, "choice": choice, **extra}


def rating(answer_id, request_id="request-0001", **extra) -> dict:
    return {"request_id": request_id, "answer_id": answer_id, **SCORES, **extra}


# ---------------------------------------------------------------------------------- home and annotator
def test_home_page_and_next(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "Human feedback" in r.text and "nobody yet" in r.text
    assert 'name="next" value="/compare"' in client.get("/?next=/compare").text
    assert 'name="next" value="/"' in client.get("/?next=//evil.com").text


def test_set_annotator_sets_the_cookie_and_redirects(client):
    r = client.post("/annotator", data={"annotator": "  Ann Lee ", "next": "/compare"})
    assert r.status_code == 303 and r.headers["location"] == "/compare"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{NAME_COOKIE}=Ann%20Lee;") and "samesite=strict" in cookie.lower()
    assert client.get("/api/progress").json()["you"] == {"name": "Ann Lee", "comparisons": 0, "ratings": 0,
                                                           "to_compare": 0, "to_rate": 0}
    assert "annotator: <b id=\"annotator-name\">Ann Lee</b>" in client.get("/").text


@pytest.mark.parametrize("name", ["", "   ", "x" * 65, "a\x07b"])
def test_set_annotator_refuses_bad_names(client, name):
    assert "annotator must be a name of 1-64 printable characters" in error(
        client.post("/annotator", data={"annotator": name}), 400)
    assert "annotator must be a name" in error(client.post("/annotator", json={"annotator": name}), 400)
    assert NAME_COOKIE not in client.cookies


@pytest.mark.parametrize("target", ["//evil.com", "//evil.com/compare", "https://evil.com/", "/\\evil.com",
                                    "evil.com", "javascript:alert(1)"])
def test_set_annotator_never_redirects_off_site(client, target):
    r = client.post("/annotator", data={"annotator": "ann", "next": target})
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_set_annotator_json_with_a_non_text_next(client):
    r = client.post("/annotator", json={"annotator": "ann", "next": 5})
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_progress_json(named, store):
    pid, a, b = queued_pair(store)
    store.add_comparison("request-0001", pid, a, b, "a", "ann")
    store.add_prompts([user("waiting")], source="x")
    assert named.get("/api/progress").json() == {
        "prompts": 2, "pairs_ready": 1, "comparisons": 1, "ratings": 0, "comparisons_saved": 1, "ratings_saved": 0,
        "comparisons_undone": 0, "ratings_undone": 0, "chat_answers": 0, "answers_to_rate": 2,
        "annotators": [{"name": "ann", "comparisons": 1, "ratings": 0}],
        "you": {"name": "ann", "comparisons": 1, "ratings": 0, "to_compare": 0, "to_rate": 2}}
    named.cookies.clear()
    assert "you" not in named.get("/api/progress").json()


# ---------------------------------------------------------------------------------- chat
def test_chat_page_lists_the_models(client):
    r = client.get("/chat")
    assert r.status_code == 200 and f'<option value="0">{TINY_MODEL}</option>' in r.text


def test_chat_answers_and_stores_a_chat_prompt(client, store):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "how are you?"}]
    r = client.post("/api/chat", json={"model": 0, "messages": messages, "seed": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == TINY_MODEL and isinstance(out["finished"], bool) and isinstance(out["text"], str)
    prompt, answer = store.prompt(out["prompt_id"]), store.answer(out["answer_id"])
    assert (prompt["messages"], prompt["source"], prompt["queued"]) == (messages, "chat", False)
    assert (answer["slot"], answer["text"], answer["model"]) == (None, out["text"], TINY_MODEL)
    assert json.loads(answer["settings"])["seed"] == 3
    assert store.queue() == [] and store.progress()["chat_answers"] == 1  # a chat is not queued for comparing
    # Same conversation and seed: the same answer, stored as a second answer of the same prompt.
    again = client.post("/api/chat", json={"messages": messages, "seed": 3}).json()
    assert (again["prompt_id"], again["text"]) == (out["prompt_id"], out["text"])
    assert again["answer_id"] != out["answer_id"]


@pytest.mark.parametrize(("body", "message"), [
    ({"model": 1}, r"model must be an index 0..0, got 1"),
    ({"model": -1}, r"model must be an index 0..0, got -1"),
    ({"model": True}, r"model must be an index 0..0, got True"),
    ({"model": "0"}, r"model must be an index 0..0, got '0'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "field 'messages': the prompt's last message is from 'assistant', not 'user'"),
    ({"messages": None}, "field 'messages': expected a non-empty list of messages"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "field 'messages': message 0 has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 32 + user("q")},
     "a chat keeps at most 64 messages of 8000 characters"),
    ({"messages": user("x" * 8001)}, "a chat keeps at most 64 messages of 8000 characters"),
    ({"seed": "x"}, "seed must be an integer, got 'x'"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
])
def test_chat_refusals(client, store, body, message):
    r = client.post("/api/chat", json={"model": 0, "messages": user("hello"), **body})
    assert message in error(r, 400)
    assert store.progress()["chat_answers"] == 0 and count(store, "prompts") == 0


@pytest.mark.parametrize(("content", "message"), [
    (b'{"model": 0, "messages": ', "the request body is not valid JSON"),
    (b"\xff\xfe", "the request body line 1, column 1: byte 0xff is not UTF-8"),  # limits.parse_json's words
    (b'[{"role": "user", "content": "q"}]', "the request body must be a JSON object"),
    (b'"text"', "the request body must be a JSON object"),
])
def test_chat_refuses_bodies_that_are_not_a_json_object(client, store, content, message):
    r = client.post("/api/chat", content=content, headers={"content-type": "application/json"})
    assert message in error(r, 400)
    assert count(store, "prompts") == 0


# ---------------------------------------------------------------------------------- compare
def test_compare_needs_a_name(client):
    r = client.get("/compare")
    assert r.status_code == 303 and r.headers["location"] == "/?next=/compare"


def test_compare_shows_the_next_pair(named, store):
    p1, a1, b1 = queued_pair(store, "first question", "first a", "first b")
    p2, a2, b2 = queued_pair(store, "second question", "second a", "second b")
    r = named.get("/compare")
    assert r.status_code == 200
    assert f'name="prompt_id" value="{p1}"' in r.text and "first question" in r.text
    assert f'name="answer_a" value="{a1}"' in r.text and f'name="answer_b" value="{b1}"' in r.text
    assert "first a" in r.text and "first b" in r.text and "(cut at the length limit)" in r.text  # b is cut
    assert re.search(r'name="request_id" value="[0-9a-f]{32}"', r.text)
    store.add_comparison("request-0001", p1, a1, b1, "a", "ann")
    assert f'name="prompt_id" value="{p2}"' in named.get("/compare").text
    assert f'name="prompt_id" value="{p1}"' in named.get(f"/compare?prompt_id={p1}").text  # asked for by id
    store.add_comparison("request-0002", p2, a2, b2, "b", "ann")
    done = named.get("/compare?saved=1")
    assert done.status_code == 200 and "Nothing left to compare" in done.text and 'id="saved"' in done.text
    named.cookies.set(NAME_COOKIE, "bob")  # another annotator still has both
    assert f'name="prompt_id" value="{p1}"' in named.get("/compare").text


def test_compare_unknown_prompt_is_404(named, store):
    assert "prompt_id 999 does not exist" in error(named.get("/compare?prompt_id=999"), 404)


def test_compare_generates_a_missing_pair_without_a_worker(named, store, answerer):
    store.add_prompts([user("generate for me")], source="x")
    pid = store.prompt_id_for(user("generate for me"))
    r = named.get("/compare")
    assert r.status_code == 200 and f'name="prompt_id" value="{pid}"' in r.text
    a, b = store.pair(pid)
    assert a["model"] == b["model"] == TINY_MODEL
    assert json.loads(a["settings"]) != json.loads(b["settings"])  # one model: two different samples
    # The pair is a function of the prompt id and the settings: a restarted server writes the same one.
    assert [x.text for x in answerer.pair(pid, user("generate for me"))] == [a["text"], b["text"]]


def test_compare_json_saves_once_per_request_id(named, store):
    pid, a, b = queued_pair(store)
    r = named.post("/compare", json=comparison(pid, a, b, "tie", comment="close"))
    assert r.status_code == 201 and r.json() == {"id": 1, "created": True}
    again = named.post("/compare", json=comparison(pid, a, b, "a"))
    assert again.status_code == 200 and again.json() == {"id": 1, "created": False}
    [row] = store.comparison_rows()
    assert (row["choice"], row["comment"], row["annotator"]) == ("tie", "close", "ann")
    # A name in the body is used over the cookie (a script judging for someone).
    named.post("/compare", json=comparison(pid, a, b, request_id="request-0002", annotator="bob"))
    assert [r["annotator"] for r in store.comparison_rows()] == ["ann", "bob"]


def test_compare_form_post_redirects(named, store):
    pid, a, b = queued_pair(store)
    r = named.post("/compare", data={k: str(v) for k, v in comparison(pid, a, b, "b").items()})
    assert r.status_code == 303 and r.headers["location"] == f"/compare?saved=1&after={pid}"
    assert store.comparison_rows()[0]["choice"] == "b"


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"choice": "c"}, 400, "choice must be one of a, b, tie, got 'c'"),
    ({"prompt_id": 999}, 404, "prompt_id 999 does not exist"),
    ({"answer_a": 999}, 404, "answer_a 999 does not exist"),
    ({"answer_b": "<other>"}, 400, "answer_b {other} answers prompt {other_pid}, not prompt_id {pid}"),
    ({"answer_b": "<a>"}, 400, "answer_a and answer_b must be two different answers"),
    ({"prompt_id": "x"}, 400, "prompt_id must be an integer id, got 'x'"),
    ({"answer_a": 1.5}, 400, "answer_a must be an integer id, got 1.5"),
    ({"answer_b": True}, 400, "answer_b must be an integer id, got True"),
    ({"answer_b": None}, 400, "answer_b must be an integer id, got None"),
    ({"request_id": "short"}, 400, "request_id must be a client-made id of 8-64 printable characters"),
    ({"comment": "x" * 4001}, 400, "comment must be text of at most 4000 characters"),
    ({"annotator": None}, 400, "annotator: give your name"),
])
def test_compare_refusals(client, store, change, status, message):
    pid, a, b = queued_pair(store)
    other_pid, other, _ = queued_pair(store, "another question")
    ids = {"<a>": a, "<other>": other}
    body = comparison(pid, a, b, annotator="ann")  # the client has no name cookie
    body.update({k: ids.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    r = client.post("/compare", json=body)
    assert message.format(other=other, other_pid=other_pid, pid=pid) in error(r, status)
    assert count(store, "comparisons") == 0


def test_compare_form_refusal_is_an_error_page(named, store):
    pid, a, b = queued_pair(store)
    r = named.post("/compare", data={k: str(v) for k, v in comparison(pid, a, 12345).items()})
    assert "answer_b 12345 does not exist" in error(r, 404)
    assert r.headers["content-type"].startswith("text/html") and 'id="back"' in r.text


# ---------------------------------------------------------------------------------- rate
def test_rate_needs_a_name(client):
    r = client.get("/rate")
    assert r.status_code == 303 and r.headers["location"] == "/?next=/rate"


def test_rate_shows_the_next_answer_then_done(named, store):
    pid, a, b = queued_pair(store, "rate this", "the a answer", "the b answer")
    r = named.get("/rate")
    assert r.status_code == 200 and f'name="answer_id" value="{a}"' in r.text and "the a answer" in r.text
    for dim in ("overall", *DIMENSIONS):
        assert all(f'id="{dim}-{v}"' in r.text for v in range(1, 6))
    store.add_rating("request-0001", a, SCORES, "ann")
    assert f'name="answer_id" value="{b}"' in named.get("/rate").text
    assert f'name="answer_id" value="{a}"' in named.get(f"/rate?answer_id={a}").text
    store.add_rating("request-0002", b, SCORES, "ann")
    assert "Nothing left to rate" in named.get("/rate").text


def test_rate_unknown_answer_is_404(named):
    assert "answer_id 999 does not exist" in error(named.get("/rate?answer_id=999"), 404)


def test_a_chat_answer_can_be_rated(named, store):
    out = named.post("/api/chat", json={"messages": user("rate my chat"), "seed": 1}).json()
    r = named.get(f"/rate?answer_id={out['answer_id']}")
    assert r.status_code == 200 and f'name="answer_id" value="{out["answer_id"]}"' in r.text
    assert "rate my chat" in r.text
    assert named.post("/rate", json=rating(out["answer_id"])).status_code == 201
    [row] = store.rating_rows()
    assert (row["response"], row["prompt"], row["annotator"]) == (out["text"], user("rate my chat"), "ann")


def test_rate_json_and_form(named, store):
    pid, a, b = queued_pair(store)
    r = named.post("/rate", json=rating(a, comment="fine"))
    assert r.status_code == 201 and r.json() == {"id": 1, "created": True}
    again = named.post("/rate", json=rating(a, overall=1))
    assert again.status_code == 200 and again.json() == {"id": 1, "created": False}
    form = named.post("/rate", data={k: str(v) for k, v in rating(b, "request-0002").items()})
    assert form.status_code == 303 and form.headers["location"] == "/rate?saved=1"
    rows = store.rating_rows()
    assert [(r["response"], r["overall"], r["relevance"], r["comment"]) for r in rows] == [
        ("answer a", 4, 2, "fine"), ("answer b", 4, 2, "")]


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"overall": 6}, 400, "overall must be an integer from 1 to 5, got 6"),
    ({"overall": "4.5"}, 400, "overall must be an integer from 1 to 5, got '4.5'"),
    ({"overall": 0}, 400, "overall must be an integer from 1 to 5, got 0"),
    ({"safety": True}, 400, "safety must be an integer from 1 to 5, got True"),
    ({"relevance": None}, 400, "relevance must be an integer from 1 to 5, got None"),
    ({"answer_id": "abc"}, 400, "answer_id must be an integer id, got 'abc'"),
    ({"answer_id": 999}, 404, "answer_id 999 does not exist"),
])
def test_rate_refusals(named, store, change, status, message):
    pid, a, b = queued_pair(store)
    body = {k: v for k, v in {**rating(a), **change}.items() if v is not None}  # None: the field is left out
    assert message in error(named.post("/rate", json=body), status)
    assert count(store, "ratings") == 0


def test_rate_without_a_name_is_refused(client, store):
    pid, a, b = queued_pair(store)
    assert "annotator: give your name" in error(client.post("/rate", json=rating(a)), 400)


# ---------------------------------------------------------------------------------- queue
def test_queue_page(client, store):
    assert "The queue is empty" in client.get("/queue").text
    pid, a, b = queued_pair(store, "queued question")
    r = client.get("/queue?imported=3,1")
    assert r.status_code == 200 and "queued question" in r.text and "test.jsonl" in r.text
    assert f'<a href="/compare?prompt_id={pid}">{pid}</a>' in r.text and "2/2" in r.text
    assert "Imported 3 new prompts (1 already present)" in r.text


def test_queue_import_json(client, store):
    body = {"prompts": ["first", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "second"}]]}
    r = client.post("/queue", json=body)
    assert r.status_code == 201 and r.json() == {"added": 2, "already_present": 0}
    again = client.post("/queue", json={"prompts": ["first", "third"]})
    assert again.json() == {"added": 1, "already_present": 1}
    queue = store.queue()
    assert [p["messages"][-1]["content"] for p in queue] == ["first", "second", "third"]
    assert {p["source"] for p in queue} == {"api"}


@pytest.mark.parametrize(("body", "message"), [
    ({"prompts": []}, "prompts must be a non-empty list of prompts"),
    ({"prompts": "one"}, "prompts must be a non-empty list of prompts"),
    ({}, "prompts must be a non-empty list of prompts"),
    ({"prompts": ["fine", 5]}, "field 'prompt 2': expected a non-empty list of messages, got int"),
    ({"prompts": [[{"role": "assistant", "content": "a"}]]},
     "field 'prompt 1': the prompt's last message is from 'assistant', not 'user'"),
])
def test_queue_json_refusals(client, store, body, message):
    assert message in error(client.post("/queue", json=body), 400)
    assert count(store, "prompts") == 0


def test_queue_upload_jsonl_and_csv(client, store):
    jsonl = b'{"prompt": "from jsonl"}\n{"prompt": [{"role": "user", "content": "as messages"}]}\n'
    r = client.post("/queue", files={"file": ("prompts.jsonl", jsonl, "application/octet-stream")})
    assert r.status_code == 303 and r.headers["location"] == "/queue?imported=2,0"
    csv = b'prompt\nfrom csv\n"with, a comma"\nfrom jsonl\n'
    r = client.post("/queue", files={"file": ("dir/more.csv", csv, "text/csv")}, headers={"accept": "application/json"})
    assert r.status_code == 201 and r.json() == {"added": 2, "already_present": 1}
    assert [(p["messages"], p["source"]) for p in store.queue()] == [
        (user("from jsonl"), "prompts.jsonl"), (user("as messages"), "prompts.jsonl"),
        (user("from csv"), "more.csv"), (user("with, a comma"), "more.csv")]
    again = client.post("/queue", files={"file": ("prompts.jsonl", jsonl, "application/octet-stream")})
    assert again.headers["location"] == "/queue?imported=0,2"


@pytest.mark.parametrize(("name", "content", "message"), [
    ("notes.txt", b"a prompt\n", "file notes.txt: use a .jsonl, .json, .csv or .parquet file"),
    ("bad.jsonl", b'{"prompt": "fine"}\n{not json\n', "bad.jsonl line 2: is not valid JSON"),
    ("columns.jsonl", b'{"prompt": "fine"}\n{"question": "q"}\n', "columns.jsonl line 2, field 'prompt'"),
    ("empty.jsonl", b"", "empty.jsonl"),
])
def test_queue_upload_refusals_name_the_file(client, store, name, content, message):
    r = client.post("/queue", files={"file": (name, content, "application/octet-stream")})
    text = error(r, 400)
    assert message in text and "upload" not in text  # the user's file name, not the server's temp file
    assert count(store, "prompts") == 0


def test_queue_upload_without_a_file(client, store):
    assert "file: choose a prompt file" in error(client.post("/queue", data={"other": "x"}), 400)
    r = client.post("/queue", files={"file": ("", b"", "application/octet-stream")})
    assert "file: choose a prompt file" in error(r, 400)


# ---------------------------------------------------------------------------------- export
@pytest.fixture
def judged(store) -> FeedbackStore:
    """One pair that ann compared (a wins) and rated (a 5, b 2): one pair from both sources."""
    pid, a, b = queued_pair(store, "export me", "the good answer", "the bad answer")
    store.add_comparison("request-0001", pid, a, b, "a", "ann")
    store.add_rating("request-0002", a, {**SCORES, "overall": 5}, "ann")
    store.add_rating("request-0003", b, {**SCORES, "overall": 2}, "ann")
    return store


def test_export_page(client, judged):
    r = client.get("/export")
    assert r.status_code == 200 and '<b id="n-pairs">1</b>' in r.text
    assert '<td title="merged">pairs found by both (kept once)</td><td>1</td>' in r.text
    # The ratings' margin (5 - 2 = 3) is under 4: their pair goes, and the comparison alone keeps it.
    stricter = client.get("/export?min_margin=4").text
    assert '<b id="n-pairs">1</b>' in stricter and '<td title="rating_pairs">pairs from ratings</td><td>0</td>' in stricter


@pytest.mark.parametrize(("query", "message"), [
    ("min_agreement=2", "min_agreement must be in [0, 1], got 2.0"),
    ("min_agreement=-0.5", "min_agreement must be in [0, 1], got -0.5"),
    ("min_margin=-1", "min_margin must be a finite number >= 0, got -1.0"),
    ("min_margin=nan", "min_margin must be a finite number >= 0, got nan"),
    ("min_margin=inf", "min_margin must be a finite number >= 0, got inf"),
])
def test_export_filters_are_checked(client, judged, query, message):
    assert message in error(client.get(f"/export?{query}"), 400)
    assert message in error(client.get(f"/export/pairs.jsonl?{query}"), 400)


def test_export_files(client, judged):
    from chatrlhf.feedback.export import feedback_to_pairs, rating_record

    def lines(name):
        r = client.get(f"/export/{name}.jsonl")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        assert r.headers["content-disposition"] == f'attachment; filename="{name}.jsonl"'
        return [json.loads(line) for line in r.text.splitlines()]

    pairs = lines("pairs")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        (user("export me"), "the good answer", "the bad answer")]
    # The same rows `chatrlhf export` writes to its files.
    expected_pairs, _ = feedback_to_pairs(judged.comparison_rows(), judged.rating_rows(), 1.0, 1.0)
    assert pairs == json.loads(json.dumps(expected_pairs))
    assert lines("ratings") == [rating_record(r) for r in judged.rating_rows()]
    assert [r["score"] for r in lines("ratings")] == [5, 2]
    assert lines("comparisons") == json.loads(json.dumps(judged.comparison_rows()))
    assert [(c["choice"], c["answer_a"]) for c in lines("comparisons")] == [("a", "the good answer")]


def test_export_unknown_file_is_404(client, judged):
    assert "no export named 'votes': use pairs, ratings, comparisons or kto" in error(client.get("/export/votes.jsonl"), 404)


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"ok": True}


# ---------------------------------------------------------------------------------- the access token
ROUTES = [("GET", "/"), ("GET", "/chat"), ("GET", "/compare"), ("GET", "/rate"), ("GET", "/queue"),
          ("GET", "/export"), ("GET", "/export/pairs.jsonl"), ("GET", "/api/progress"), ("GET", "/static/app.js"),
          ("GET", "/static/style.css"), ("POST", "/annotator"), ("POST", "/api/chat"), ("POST", "/compare"),
          ("POST", "/rate"), ("POST", "/queue")]


@pytest.fixture
def locked(store, answerer):
    with make_client(store, answerer, token=TOKEN, allowed_hosts=None) as c:
        yield c


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_needs_the_token(locked, store, method, path):
    body = {"json": {"prompts": ["sneaked in"]}} if method == "POST" else {}
    for headers, cookies in [({}, {}), ({"authorization": "Bearer wrong-token-0123456789"}, {}),
                             ({}, {TOKEN_COOKIE: "wrong-token-0123456789"}), ({"authorization": TOKEN}, {})]:
        locked.cookies.clear()
        for name, value in cookies.items():
            locked.cookies.set(name, value)
        r = locked.request(method, path, headers=headers, **body)
        assert r.status_code == 401, (headers, cookies)
        assert "missing or wrong access token" in r.text and r.headers["www-authenticate"] == "Bearer"
    r = locked.request(method, f"{path}?token=wrong-token-0123456789", **body)
    assert r.status_code == 401
    assert count(store, "prompts") == 0


@pytest.mark.parametrize("path", ["/", "/chat", "/queue", "/export", "/api/progress", "/static/app.js"])
def test_bearer_token_opens_every_page(locked, path):
    assert locked.get(path, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_bearer_token_on_a_post(locked, store):
    r = locked.post("/queue", json={"prompts": ["q"]}, headers={"authorization": f"bearer {TOKEN}"})
    assert r.status_code == 201 and count(store, "prompts") == 1


def test_token_in_the_url_becomes_a_cookie(locked):
    r = locked.get(f"/queue?imported=1,0&token={TOKEN}")
    assert r.status_code == 303
    location = urlsplit(r.headers["location"])
    assert (location.path, parse_qs(location.query)) == ("/queue", {"imported": ["1,0"]})  # the token is gone
    assert TOKEN not in r.headers["location"]
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{TOKEN_COOKIE}={TOKEN};")
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert locked.get("/").status_code == 200  # the cookie alone
    assert locked.post("/queue", json={"prompts": ["q"]}).status_code == 201
    assert locked.get(f"/?token={TOKEN}").headers["location"] == f"{BASE}/"


def test_healthz_needs_no_token_and_no_host(locked, client):
    assert locked.get("/healthz").status_code == 200
    assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 200


def test_with_a_token_any_host_is_served(locked):
    # Off loopback the token is the guard, and the Host is whatever name the server is reached by.
    r = locked.get("/", headers={"host": "feedback.example:8000", "authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


# ---------------------------------------------------------------------------------- host, origin, size
@pytest.mark.parametrize(("host", "status"), [
    ("evil.example", 400), ("evil.example:8000", 400), ("127.0.0.1.evil.example:8000", 400),
    ("localhost:8000", 200), ("127.0.0.1:8000", 200), ("127.0.0.1", 200), ("[::1]:8000", 200),
])
def test_host_header_without_a_token(client, host, status):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends Host evil.example."""
    r = client.get("/api/progress", headers={"host": host})
    assert r.status_code == status
    if status == 400:
        assert "is not served: open http://127.0.0.1 instead" in r.text


@pytest.mark.parametrize(("origin", "status"), [
    ("http://evil.example", 403), ("http://127.0.0.1:9999", 403), ("null", 403), ("http://127.0.0.1:8000", 201),
])
def test_cross_site_posts_are_refused(client, store, origin, status):
    r = client.post("/queue", json={"prompts": ["q"]}, headers={"origin": origin})
    assert r.status_code == status
    assert count(store, "prompts") == (1 if status == 201 else 0)
    if status == 403:
        assert "cross-site request refused" in r.text


def test_cross_site_get_is_served(client):
    assert client.get("/", headers={"origin": "http://evil.example"}).status_code == 200


@pytest.fixture
def small(store, answerer):
    with make_client(store, answerer, max_request_bytes=1024) as c:
        yield c


def test_body_over_the_cap_by_content_length(small, store):
    body = json.dumps({"prompts": ["x" * 100] * 20}).encode()
    assert len(body) > 1024
    r = small.post("/queue", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "request body over 1024 bytes (--max_request_bytes)" in r.json()["error"]
    r = small.post("/queue", files={"file": ("big.jsonl", b'{"prompt": "q"}\n' * 100, "application/octet-stream")})
    assert r.status_code == 413
    assert count(store, "prompts") == 0


def chunks(data: bytes):
    """A generator body: httpx sends it with Transfer-Encoding: chunked and no Content-Length, so only
    counting the bytes as they arrive can stop it."""
    for i in range(0, len(data), 256):
        yield data[i:i + 256]


def test_chunked_body_over_the_cap(small, store):
    body = json.dumps({"prompts": [f"prompt {i} " + "x" * 100 for i in range(20)]}).encode()
    r = small.post("/queue", content=chunks(body), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "request body over 1024 bytes" in r.json()["error"]
    upload = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
              b"Content-Type: application/octet-stream\r\n\r\n" + b'{"prompt": "q"}\n' * 100 + b"\r\n--XyZ--\r\n")
    r = small.post("/queue", content=chunks(upload), headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert r.status_code == 413
    assert count(store, "prompts") == 0
    # The same ways, under the cap, are read and saved: the 413s above came from the size alone.
    ok = small.post("/queue", content=chunks(json.dumps({"prompts": ["a", "b"]}).encode()),
                    headers={"content-type": "application/json"})
    assert ok.status_code == 201 and count(store, "prompts") == 2
    r = small.post("/queue", content=chunks(upload.replace(b'{"prompt": "q"}\n' * 100, b'{"prompt": "c"}\n')),
                   headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert r.status_code == 303 and count(store, "prompts") == 3


# ---------------------------------------------------------------------------------- CSP and escaping
def html_pages(client, store) -> dict:
    """Every page the app renders, in each of its states."""
    pid, a, b = queued_pair(store)
    pages = {"home": client.get("/"), "chat": client.get("/chat"), "queue": client.get("/queue?imported=1,0"),
             "export": client.get("/export"), "compare": client.get("/compare"), "rate": client.get("/rate"),
             "error 404": client.get("/compare?prompt_id=999"), "error 400": client.get("/export?min_agreement=2")}
    store.add_comparison("request-0001", pid, a, b, "a", "ann")
    store.add_rating("request-0002", a, SCORES, "ann")
    store.add_rating("request-0003", b, SCORES, "ann")
    pages["done compare"], pages["done rate"] = client.get("/compare?saved=1"), client.get("/rate")
    return pages


def test_every_page_has_a_strict_csp_and_no_inline_code(named, store):
    for name, r in html_pages(named, store).items():
        assert r.headers["content-type"].startswith("text/html"), name
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp, name
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, name
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY", name
        # The pages must work under that policy: scripts only from files, no inline handlers or styles.
        assert all(s == '<script src="/static/app.js" defer>' for s in re.findall(r"<script[^>]*>", r.text)), name
        assert not re.search(r"\son[a-z]+\s*=|\sstyle\s*=|javascript:", r.text, re.I), name


def test_model_and_prompt_markup_is_escaped(named, store):
    store.add_prompts([user(XSS_PROMPT)], source="x")
    pid = store.prompt_id_for(user(XSS_PROMPT))
    a = store.add_answer(pid, "m1", XSS_ANSWER, True, {}, slot="a")
    store.add_answer(pid, "m2", "plain", True, {}, slot="b")
    named.cookies.set(NAME_COOKIE, "%3Ci%3Eann%3C%2Fi%3E")  # the name <i>ann</i>, quoted as /annotator sets it
    for path in ("/compare", f"/rate?answer_id={a}", "/queue", "/"):
        r = named.get(path)
        assert r.status_code == 200, path
        assert "&lt;i&gt;ann&lt;/i&gt;" in r.text and "<i>" not in r.text, path
        if path == "/":
            continue
        assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;" in r.text, path
        assert "<img" not in r.text and "<script>alert" not in r.text, path
        if path != "/queue":
            assert "&lt;b onmouseover=&#34;alert(3)&#34;&gt;bold&lt;/b&gt;" in r.text, path
            assert "<b onmouseover" not in r.text and "evil.example/x.js\"></script>" not in r.text, path


def test_waiting_page_while_the_worker_generates(store, answerer):
    worker = PairWorker(store, answerer)  # never started: the pair stays missing
    store.add_prompts([user("not answered yet")], source="x")
    with make_client(store, answerer, worker) as c:
        c.cookies.set(NAME_COOKIE, "ann")
        for path in ("/compare", "/rate"):
            worker._wake.clear()
            r = c.get(path)
            assert r.status_code == 200 and '<meta http-equiv="refresh" content="2">' in r.text, path
            assert "Generating" in r.text and "not answered yet" in r.text, path
            assert worker._wake.is_set(), path  # the worker was told a page waits
        assert store.pair(store.prompt_id_for(user("not answered yet"))) is None
        worker.fill()
        assert 'name="prompt_id"' in c.get("/compare").text


def test_worker_answers_requested_prompts_first_and_once(store, answerer):
    store.add_prompts([user("one"), user("two"), user("three")], source="x")
    worker = PairWorker(store, answerer, pregenerate=False)
    assert worker.fill() == 0  # nothing asked for: nothing generated ahead
    for _ in range(3):  # three pages waiting on the same prompt
        worker.request(3)
    assert worker.fill() == 1 and store.pair(3) is not None and store.pair(1) is None
    worker.pregenerate = True
    worker.request(2)
    assert worker._next() == 2  # a waiting page goes before the queue order
    assert worker.fill() == 2 and store.pair(1) is not None


def test_comparing_a_chat_prompt_queues_it_for_its_pair(store, answerer):
    worker = PairWorker(store, answerer)
    with make_client(store, answerer, worker) as c:
        c.cookies.set(NAME_COOKIE, "ann")
        chat = c.post("/api/chat", json={"messages": user("chat only")}).json()
        assert not store.prompt(chat["prompt_id"])["queued"]
        assert "Generating" in c.get(f"/compare?prompt_id={chat['prompt_id']}").text
        assert store.prompt(chat["prompt_id"])["queued"]
        assert worker.fill() == 1
        assert f'name="prompt_id" value="{chat["prompt_id"]}"' in c.get(f"/compare?prompt_id={chat['prompt_id']}").text


class _FailsOnPrompt(PairWorker):
    """A real worker whose generation fails for one prompt (as a model error would)."""

    def __init__(self, store, answerer, bad: int):
        super().__init__(store, answerer)
        self.bad = bad

    def answer_prompt(self, prompt_id: int) -> None:
        if prompt_id == self.bad:
            raise RuntimeError("out of memory")
        super().answer_prompt(prompt_id)


def test_worker_passes_over_a_prompt_that_fails(store, answerer):
    store.add_prompts([user("one"), user("two"), user("three")], source="x")
    worker = _FailsOnPrompt(store, answerer, bad=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        worker.fill()
    assert worker.failed == {1} and store.pair(2) is None
    assert worker.fill() == 2  # prompts 2 and 3: the failed prompt no longer holds up the queue
    assert store.pair(1) is None and store.pair(2) is not None and store.pair(3) is not None

    worker = _FailsOnPrompt(store, answerer, bad=4)  # the background loop records the failure for the pages
    store.add_prompts([user("four")], source="x")
    thread = worker.start()
    try:
        for _ in range(100):
            if worker.error:
                break
            thread.join(0.1)
    finally:
        worker.stop()
    assert worker.error == "prompts [4] not answered: RuntimeError: out of memory"
    with make_client(store, answerer, worker) as c:
        assert "answer generation failed: prompts [4] not answered" in c.get("/").text


# ---------------------------------------------------------------------------------- undo
def undo_form(page: str) -> dict | None:
    """The "Undo last" form's fields on a page, or None when the page has no such form."""
    form = re.search(r'<form method="post" action="/undo"(.*?)</form>', page, re.S)
    if form is None:
        return None
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', form.group(1)))


def test_undo_form_goes_back_to_the_compared_prompt(named, store):
    p1, a1, b1 = queued_pair(store, "first question", "first a", "first b")
    p2, _, _ = queued_pair(store, "second question")
    first = named.get("/compare").text
    assert undo_form(first) is None  # nothing to undo yet
    named.post("/compare", data={k: str(v) for k, v in comparison(p1, a1, b1, "b").items()})
    page = named.get(f"/compare?saved=1&after={p1}").text
    assert f'name="prompt_id" value="{p2}"' in page
    form = undo_form(page)
    assert form["kind"] == "compare" and re.fullmatch("[0-9a-f]{32}", form["request_id"])
    assert '<button type="submit" id="undo"' in page and '"u": "undo"' in named.get("/static/app.js").text
    r = named.post("/undo", data=form)
    assert r.status_code == 303 and r.headers["location"] == f"/compare?prompt_id={p1}&undone=1"
    back = named.get(r.headers["location"]).text
    assert 'id="undone">Undone.' in back and f'name="prompt_id" value="{p1}"' in back
    assert undo_form(back) is None  # ann's only comparison is undone
    # the form sent again (a double click) undoes nothing more and goes to the same place
    again = named.post("/undo", data=form)
    assert again.status_code == 303 and again.headers["location"] == r.headers["location"]
    assert count(store, "retractions") == 1 and count(store, "comparisons") == 1
    you = named.get("/api/progress").json()["you"]
    assert (you["comparisons"], you["to_compare"]) == (0, 2)
    assert f'name="prompt_id" value="{p1}"' in named.get("/compare").text  # first in the queue again


def test_undo_a_rating_by_form_and_json(named, store):
    pid, a, b = queued_pair(store)
    named.post("/rate", data={k: str(v) for k, v in rating(a).items()})
    page = named.get("/rate?saved=1").text
    assert f'name="answer_id" value="{b}"' in page and undo_form(page)["kind"] == "rate"
    assert "Ctrl+Enter" in page
    r = named.post("/undo", data=undo_form(page))
    assert r.status_code == 303 and r.headers["location"] == f"/rate?answer_id={a}&undone=1"
    assert 'id="undone">Undone. Your last rating' in named.get(r.headers["location"]).text
    assert named.get("/rate").text.count(f'name="answer_id" value="{a}"') == 1  # a is next again
    # JSON: what was retracted; the same request_id again is 200 with created false
    named.post("/rate", json=rating(b, request_id="request-0002", annotator="bob"))
    body = {"kind": "rate", "request_id": "undo-request-1", "annotator": "bob"}
    r = named.post("/undo", json=body)
    assert r.status_code == 201 and r.json() == {"kind": "rating", "id": 2, "prompt_id": pid, "answer_id": b,
                                                 "created": True}
    r = named.post("/undo", json=body)
    assert r.status_code == 200 and r.json()["created"] is False and r.json()["id"] == 2
    assert store.rating_rows() == []


@pytest.mark.parametrize(("body", "message"), [
    ({"kind": "rate", "request_id": "undo-request-1"}, "kind: ann has no rating to undo (none saved, or all undone"),
    ({"kind": "compare", "request_id": "undo-request-1"}, "kind: ann has no comparison to undo"),
    ({"kind": "ratings", "request_id": "undo-request-1"}, "kind must be 'compare' or 'rate' (the page whose last"),
    ({"kind": ["rate"], "request_id": "undo-request-1"}, "kind must be 'compare' or 'rate'"),
    ({"request_id": "undo-request-1"}, "kind must be 'compare' or 'rate' (the page whose last judgement to undo), got None"),
    ({"kind": "compare", "request_id": "x"}, "request_id must be a client-made id of 8-64 printable characters"),
    ({"kind": "compare", "request_id": "undo-request-1", "annotator": 5}, "annotator must be a name"),
])
def test_undo_refusals_name_the_field(named, store, body, message):
    queued_pair(store)
    assert message in error(named.post("/undo", json=body), 400)
    if all(isinstance(v, str) for v in body.values()):  # what a form can send: the same refusal, as a page
        r = named.post("/undo", data=body)
        assert message in error(r, 400) and r.headers["content-type"].startswith("text/html")
    assert count(store, "retractions") == 0


def test_undo_without_a_name_and_from_another_site_is_refused(client, store):
    pid, a, b = queued_pair(store)
    store.add_comparison("request-0001", pid, a, b, "a", "ann")
    body = {"kind": "compare", "request_id": "undo-request-1"}
    assert "annotator: give your name" in error(client.post("/undo", json=body), 400)
    client.cookies.set(NAME_COOKIE, "ann")
    r = client.post("/undo", data=body, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site request refused" in r.text
    assert count(store, "retractions") == 0
    assert client.post("/undo", data=body, headers={"origin": BASE}).status_code == 303


def test_undo_needs_the_token(locked, store):
    pid, a, b = queued_pair(store)
    store.add_comparison("request-0001", pid, a, b, "a", "ann")
    body = {"kind": "compare", "request_id": "undo-request-1", "annotator": "ann"}
    assert locked.post("/undo", json=body).status_code == 401
    assert count(store, "retractions") == 0
    assert locked.post("/undo", json=body, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 201


def agreement_rows(page: str) -> list[list[str]]:
    return [[html.unescape(c.strip()) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r'<tr class="agreement-row">(.*?)</tr>', page, re.S)]


def test_two_annotators_one_undoes(named, store):
    """ann: p1 A, p2 A; bob: p1 B, p2 A. By hand, min agreement 1: p1 1-1 -> tie (agreement 0.50), p2 2-0 ->
    kept (1.00); pairs: p2. bob undoes (his latest: p2): p2 has ann alone -> kept with 1 vote, out of the table;
    p1 unchanged; bob has 1 compared, p2 left to compare and shown next. bob undoes again (p1): p1 is ann's
    A alone -> kept; 2 pairs, an empty table."""
    p1, a1, b1 = queued_pair(store, XSS_PROMPT, "first a", "first b")
    p2, a2, b2 = queued_pair(store, "second question", "second a", "second b")
    for n, (pid, a, b, who, choice) in enumerate([(p1, a1, b1, "ann", "a"), (p2, a2, b2, "ann", "a"),
                                                  (p1, a1, b1, "bob", "b"), (p2, a2, b2, "bob", "a")]):
        named.post("/compare", json=comparison(pid, a, b, choice, request_id=f"request-{n:04d}", annotator=who))
    page = named.get("/export").text
    assert agreement_rows(page) == [[XSS_PROMPT, "2", "1", "1", "0", "0.50", "dropped: tie (A and B have equal votes)"],
                                    ["second question", "2", "2", "0", "0", "1.00", "kept: A preferred"]]
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    pairs = [json.loads(x) for x in named.get("/export/pairs.jsonl").text.splitlines()]
    assert [(p["chosen"], p["votes"]) for p in pairs] == [("second a", 2)]

    named.cookies.set(NAME_COOKIE, "bob")
    r = named.post("/undo", json={"kind": "compare", "request_id": "undo-request-1"})
    assert r.json() == {"kind": "comparison", "id": 4, "prompt_id": p2, "answer_id": None, "created": True}
    progress = named.get("/api/progress").json()
    assert (progress["comparisons"], progress["comparisons_saved"], progress["comparisons_undone"]) == (3, 3, 1)
    assert progress["annotators"] == [{"name": "ann", "comparisons": 2, "ratings": 0},
                                      {"name": "bob", "comparisons": 1, "ratings": 0}]
    assert (progress["you"]["comparisons"], progress["you"]["to_compare"]) == (1, 1)
    assert f'name="prompt_id" value="{p2}"' in named.get("/compare").text
    assert [(q["id"], q["n_comparisons"]) for q in store.queue()] == [(p1, 2), (p2, 1)]
    page = named.get("/export").text
    assert agreement_rows(page) == [[XSS_PROMPT, "2", "1", "1", "0", "0.50", "dropped: tie (A and B have equal votes)"]]
    pairs = [json.loads(x) for x in named.get("/export/pairs.jsonl").text.splitlines()]
    assert [(p["chosen"], p["votes"]) for p in pairs] == [("second a", 1)]

    named.post("/undo", json={"kind": "compare", "request_id": "undo-request-2"})
    page = named.get("/export").text
    assert agreement_rows(page) == [] and 'id="agreement-none"' in page and '<b id="n-pairs">2</b>' in page
    assert named.get("/api/progress").json()["you"]["to_compare"] == 2


def test_agreement_table_is_capped(client, store):
    """52 pairs that two annotators split on: 50 rows shown, "2 more not shown"."""
    for i in range(52):
        pid, a, b = queued_pair(store, f"question {i}")
        store.add_comparison(f"request-{i:04d}-a", pid, a, b, "a", "ann")
        store.add_comparison(f"request-{i:04d}-b", pid, a, b, "b", "bob")
    page = client.get("/export?min_agreement=0.5").text
    rows = agreement_rows(page)
    assert len(rows) == 50 and rows[0][0] == "question 0" and rows[-1][0] == "question 49"
    assert '<p class="hint" id="agreement-more">2 more not shown.</p>' in page
    assert all(row[5:] == ["0.50", "dropped: tie (A and B have equal votes)"] for row in rows)
