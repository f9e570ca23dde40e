"""The feedback database (``FeedbackStore``): schema and file checks, validation of every write, the
next-task queries, the progress counters, the export rows and concurrent writers in several processes."""

import json
import multiprocessing
import sqlite3

import pytest

from chatrlhf.feedback.judgements import Undone
from chatrlhf.feedback.schema import (
    DIMENSIONS,
    MAX_COMMENT,
    MAX_NAME,
    SCHEMA_VERSION,
    FeedbackError,
    NotFound,
    Saved,
    canonical,
)
from chatrlhf.feedback.store import FeedbackStore

SCORES = {"overall": 4, "consistency": 5, "engagingness": 3, "safety": 5, "relevance": 2}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    return FeedbackStore(tmp_path / "feedback.db")


def add_pair(store: FeedbackStore, prompt_id: int, a: str = "answer a", b: str = "answer b") -> tuple[int, int]:
    return (store.add_answer(prompt_id, "m1", a, True, {"seed": 1}, slot="a"),
            store.add_answer(prompt_id, "m2", b, False, {"seed": 2}, slot="b"))


@pytest.fixture
def filled(store) -> dict:
    """Queue p1, p2, p3 (pairs for p1 and p2, none yet for p3) and a chat prompt p4 with one chat answer."""
    store.add_prompts([user("one"), user("two"), user("three")], source="prompts.jsonl")
    store.add_prompts([user("chat")], source="chat", queued=False)
    p1, p2, p3, p4 = (store.prompt_id_for(user(t)) for t in ("one", "two", "three", "chat"))
    a1, b1 = add_pair(store, p1, "one a", "one b")
    a2, b2 = add_pair(store, p2, "two a", "two b")
    chat = store.add_answer(p4, "m1", "chat answer", True, {"seed": 7})
    return {"p1": p1, "p2": p2, "p3": p3, "p4": p4, "a1": a1, "b1": b1, "a2": a2, "b2": b2, "chat": chat}


def count(store: FeedbackStore, table: str) -> int:
    con = sqlite3.connect(store.path)
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


# ------------------------------------------------------------------------------------ the file
def test_new_file_gets_schema_wal_and_version(tmp_path):
    path = tmp_path / "sub" / "feedback.db"  # the parent dir is made too
    FeedbackStore(path)
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"meta", "prompts", "answers", "annotators", "comparisons", "ratings", "retractions"}
    # WAL is a property of the file: a plain connection that set nothing sees it.
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION) == "2"
    con.close()


def test_reopening_keeps_the_data(tmp_path, store):
    store.add_prompts([user("kept")], source="x.jsonl")
    pid = store.prompt_id_for(user("kept"))
    answer = store.add_answer(pid, "m", "text", True, {})
    store.add_rating("request-0001", answer, SCORES, "ann")
    again = FeedbackStore(store.path)
    assert [p["messages"] for p in again.queue()] == [user("kept")]
    assert again.rating_rows()[0]["response"] == "text"
    assert again.add_prompts([user("kept")], source="x.jsonl") == (0, 1)


def test_refuses_another_apps_sqlite_file(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(FeedbackError, match=r"--db .*other\.db is an SQLite database of something else \(tables: users\);"
                       " name a new file"):
        FeedbackStore(path)
    con = sqlite3.connect(path)  # and it was left as it was
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["users"]
    con.close()


def test_refuses_a_file_that_is_not_sqlite(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are notes, not a database\n" * 10)
    with pytest.raises(FeedbackError, match=r"--db .*notes\.db is not a chatrlhf feedback database"):
        FeedbackStore(path)
    assert path.read_text() == "these are notes, not a database\n" * 10


def test_refuses_a_directory(tmp_path):
    with pytest.raises(FeedbackError, match=r"--db .* is a directory; name a file such as .*feedback\.db"):
        FeedbackStore(tmp_path)


def test_refuses_a_newer_schema(store):
    con = sqlite3.connect(store.path)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    with pytest.raises(FeedbackError, match="has schema version 3, newer than this chatrlhf"):
        FeedbackStore(store.path)


# ------------------------------------------------------------------------------------ prompts
def test_add_prompts_dedupes_by_canonical_messages(store):
    first = [{"role": "user", "content": "hi"}]
    same_keys_other_order = [{"content": "hi", "role": "user"}]
    assert canonical(first) == canonical(same_keys_other_order)
    assert store.add_prompts([first, user("other"), same_keys_other_order], source="a.jsonl") == (2, 1)
    assert store.add_prompts([user("other"), user("new")], source="b.jsonl") == (1, 1)
    queue = store.queue()
    assert [(p["messages"][0]["content"], p["source"]) for p in queue] == [
        ("hi", "a.jsonl"), ("other", "a.jsonl"), ("new", "b.jsonl")]
    assert [p["id"] for p in queue] == sorted(p["id"] for p in queue)
    # Whitespace is part of the identity: a different text is a different prompt.
    assert store.add_prompts([user("hi ")], source="c.jsonl") == (1, 0)


def test_importing_a_chat_prompt_queues_it(store):
    store.add_prompts([user("from chat")], source="chat", queued=False)
    assert store.queue() == []
    assert store.prompt(store.prompt_id_for(user("from chat")))["queued"] is False
    assert store.add_prompts([user("from chat")], source="prompts.jsonl") == (0, 1)
    [row] = store.queue()
    assert row["messages"] == user("from chat") and row["queued"] is True
    assert row["source"] == "chat"  # where it first came from
    # A chat turn on a queued prompt does not take it out of the queue.
    store.add_prompts([user("from chat")], source="chat", queued=False)
    assert len(store.queue()) == 1


@pytest.mark.parametrize(("messages", "message"), [
    ([], r"field 'prompt 2': expected a non-empty list of messages"),
    (5, r"field 'prompt 2': expected a non-empty list of messages, got int"),
    ([{"role": "user"}], r"field 'prompt 2': message content must be a string, got NoneType"),
    ([{"role": "bot", "content": "x"}], r"field 'prompt 2': message 0 has unknown role 'bot'"),
    ([{"role": "user", "content": "  "}], r"field 'prompt 2': message 0 \(user\) is empty"),
    ([{"role": "user", "content": 5}], r"field 'prompt 2': message content must be a string, got int"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "field 'prompt 2': the prompt's last message is from 'assistant', not 'user'"),
])
def test_add_prompts_refuses_bad_messages_and_adds_none(store, messages, message):
    with pytest.raises(FeedbackError, match=message):
        store.add_prompts([user("fine"), messages], source="x.jsonl")
    assert store.queue() == []  # checked before anything is written


def test_add_prompts_reads_prompts_as_data_files_do(store):
    # Text is one user turn; ShareGPT roles and keys map onto role/content; other keys are dropped.
    store.add_prompts(["hello", [{"from": "human", "value": "hi"}], [{"role": "user", "content": "x", "name": "b"}]],
                      source="x")
    assert [p["messages"] for p in store.queue()] == [user("hello"), user("hi"), user("x")]


def test_prompt_and_queue_lookups(filled, store):
    assert store.prompt(filled["p4"]) == {"id": filled["p4"], "messages": user("chat"), "source": "chat",
                                          "queued": False, "created_at": store.prompt(filled["p4"])["created_at"]}
    with pytest.raises(NotFound, match="prompt_id 999 does not exist"):
        store.prompt(999)
    assert store.prompt_id_for(user("nowhere")) is None
    assert [p["id"] for p in store.queue()] == [filled["p1"], filled["p2"], filled["p3"]]
    assert [p["id"] for p in store.queue(limit=1, offset=1)] == [filled["p2"]]
    assert [p["n_answers"] for p in store.queue()] == [2, 2, 0]
    assert store.prompts_missing_answers(limit=5) == [filled["p3"]]


# ------------------------------------------------------------------------------------ answers
def test_add_answer_pair_slot_is_filled_once(store):
    store.add_prompts([user("q")], source="x")
    pid = store.prompt_id_for(user("q"))
    first = store.add_answer(pid, "m1", "first", True, {"seed": 1}, slot="a")
    # A second worker that generated the same slot gets the first answer back; nothing is overwritten.
    assert store.add_answer(pid, "m2", "second", False, {"seed": 2}, slot="a") == first
    assert store.answer(first)["text"] == "first"
    assert store.pair(pid) is None
    second = store.add_answer(pid, "m2", "b text", False, {"seed": 2, "t": 0.7}, slot="b")
    a, b = store.pair(pid)
    assert (a["id"], a["slot"], b["id"], b["slot"]) == (first, "a", second, "b")
    assert (b["model"], b["finished"], json.loads(b["settings"])) == ("m2", 0, {"seed": 2, "t": 0.7})
    # Chat answers (no slot) are never merged and never count as the pair.
    c1, c2 = (store.add_answer(pid, "m1", "chat", True, {}) for _ in range(2))
    assert c1 != c2 and store.answer(c1)["slot"] is None
    assert count(store, "answers") == 4


def test_add_answer_refuses_unknown_prompt_and_bad_slot(store):
    with pytest.raises(NotFound, match="prompt_id 42 does not exist"):
        store.add_answer(42, "m", "text", True, {})
    store.add_prompts([user("q")], source="x")
    with pytest.raises(FeedbackError, match="slot must be 'a', 'b' or None, got 'c'"):
        store.add_answer(store.prompt_id_for(user("q")), "m", "text", True, {}, slot="c")
    with pytest.raises(NotFound, match="answer_id 9 does not exist"):
        store.answer(9)
    assert count(store, "answers") == 0


# ------------------------------------------------------------------------------------ judgements
def test_add_comparison_saves_once_per_request_id(filled, store):
    saved = store.add_comparison("request-0001", filled["p1"], filled["a1"], filled["b1"], "a", "ann", " why ")
    assert saved == Saved(saved.id, True)
    # The same request (a resubmitted form) changes nothing, even with other content.
    assert store.add_comparison("request-0001", filled["p1"], filled["a1"], filled["b1"], "b", "bob") == \
        Saved(saved.id, False)
    assert count(store, "comparisons") == 1
    [row] = store.comparison_rows()
    assert (row["choice"], row["annotator"], row["comment"]) == ("a", "ann", "why")


def test_add_rating_saves_once_per_request_id(filled, store):
    saved = store.add_rating("request-0001", filled["a1"], {**SCORES, "overall": "4"}, "ann")  # form text is fine
    assert saved == Saved(saved.id, True)
    assert store.add_rating("request-0001", filled["a1"], {**SCORES, "overall": 1}, "bob") == Saved(saved.id, False)
    assert count(store, "ratings") == 1
    assert store.rating_rows()[0]["overall"] == 4
    # A second rating of the same answer by the same person is a new judgement, not a duplicate.
    assert store.add_rating("request-0002", filled["a1"], SCORES, "ann").created
    assert count(store, "ratings") == 2


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"choice": "c"}, FeedbackError, "choice must be one of a, b, tie, got 'c'"),
    ({"choice": None}, FeedbackError, "choice must be one of a, b, tie, got None"),
    ({"answer_b": "a1"}, FeedbackError, "answer_a and answer_b must be two different answers"),
    ({"answer_b": "a2"}, FeedbackError, r"answer_b \d+ answers prompt \d+, not prompt_id \d+"),
    ({"answer_a": "chat"}, FeedbackError, r"answer_a \d+ answers prompt \d+, not prompt_id \d+"),
    ({"prompt_id": 999}, NotFound, "prompt_id 999 does not exist"),
    ({"answer_a": 999}, NotFound, "answer_a 999 does not exist"),
    ({"answer_b": 998}, NotFound, "answer_b 998 does not exist"),
    ({"comment": "x" * (MAX_COMMENT + 1)}, FeedbackError, f"comment must be text of at most {MAX_COMMENT}"),
    ({"comment": 5}, FeedbackError, "comment must be text"),
    ({"request_id": "short"}, FeedbackError, "request_id must be a client-made id of 8-64 printable"),
    ({"request_id": "x" * 65}, FeedbackError, "request_id must be"),
    ({"request_id": "request\n-0002"}, FeedbackError, "request_id must be"),
    ({"request_id": 12345678}, FeedbackError, "request_id must be"),
    ({"annotator": ""}, FeedbackError, f"annotator must be a name of 1-{MAX_NAME} printable characters"),
    ({"annotator": "   "}, FeedbackError, "annotator must be a name"),
    ({"annotator": "x" * (MAX_NAME + 1)}, FeedbackError, "annotator must be a name"),
    ({"annotator": "ann\x00"}, FeedbackError, "annotator must be a name"),
    ({"annotator": None}, FeedbackError, "annotator must be a name"),
])
def test_add_comparison_refusals_name_the_field(filled, store, change, error, message):
    args = {"request_id": "request-0002", "prompt_id": "p1", "answer_a": "a1", "answer_b": "b1", "choice": "a",
            "annotator": "ann", "comment": ""}
    args.update(change)
    args = {k: filled.get(v, v) if isinstance(v, str) and k in ("prompt_id", "answer_a", "answer_b") else v
            for k, v in args.items()}
    with pytest.raises(error, match=message):
        store.add_comparison(**args)
    assert count(store, "comparisons") == count(store, "annotators") == 0


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"overall": 0}, FeedbackError, "overall must be an integer from 1 to 5, got 0"),
    ({"overall": 6}, FeedbackError, "overall must be an integer from 1 to 5, got 6"),
    ({"overall": 4.5}, FeedbackError, "overall must be an integer from 1 to 5, got 4.5"),
    ({"overall": "4.5"}, FeedbackError, "overall must be an integer from 1 to 5, got '4.5'"),
    ({"overall": 4.0}, FeedbackError, "overall must be an integer from 1 to 5, got 4.0"),
    ({"overall": "x"}, FeedbackError, "overall must be an integer from 1 to 5, got 'x'"),
    ({"overall": True}, FeedbackError, "overall must be an integer from 1 to 5, got True"),
    ({"safety": 6}, FeedbackError, "safety must be an integer from 1 to 5, got 6"),
    ({"relevance": None}, FeedbackError, "relevance must be an integer from 1 to 5, got None"),
    ({"answer_id": 999}, NotFound, "answer_id 999 does not exist"),
    ({"comment": "x" * (MAX_COMMENT + 1)}, FeedbackError, "comment must be text of at most"),
    ({"request_id": "1234567"}, FeedbackError, "request_id must be a client-made id"),
    ({"annotator": "x" * (MAX_NAME + 1)}, FeedbackError, "annotator must be a name"),
])
def test_add_rating_refusals_name_the_field(filled, store, change, error, message):
    scores = {**SCORES, **{k: v for k, v in change.items() if k in ("overall", *DIMENSIONS)}}
    if "relevance" in change and change["relevance"] is None:
        del scores["relevance"]  # a missing dimension
    args = {"request_id": "request-0002", "answer_id": filled["a1"], "scores": scores, "annotator": "ann",
            "comment": ""}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(error, match=message):
        store.add_rating(**args)
    assert count(store, "ratings") == count(store, "annotators") == 0


def test_check_constraints_hold_for_raw_sql(filled, store):
    """Code that bypasses the Python checks (another tool, a hand-written query) still cannot store an
    out-of-range row: each bad row differs from an accepted one in one column."""
    store.add_rating("request-0001", filled["a1"], SCORES, "ann")
    ann = store.annotator_id("ann")
    comparison = ("INSERT INTO comparisons (request_id, prompt_id, answer_a, answer_b, choice, comment, annotator_id,"
                  " created_at) VALUES (:request_id, :prompt_id, :answer_a, :answer_b, :choice, :comment, :who, 0)")
    rating = (f"INSERT INTO ratings (request_id, answer_id, overall, {', '.join(DIMENSIONS)}, comment, annotator_id,"
              f" created_at) VALUES (:request_id, :answer_id, :overall, {', '.join(':' + d for d in DIMENSIONS)},"
              " :comment, :who, 0)")
    annotator = "INSERT INTO annotators (name, created_at) VALUES (:name, 0)"
    prompt = "INSERT INTO prompts (messages, key, source, queued, created_at) VALUES ('[]', :key, 's', :queued, 0)"
    answer = ("INSERT INTO answers (prompt_id, slot, model, text, finished, settings, created_at)"
              " VALUES (:prompt_id, :slot, 'm', 't', :finished, '{}', 0)")
    good = {
        comparison: {"request_id": "raw-000001", "prompt_id": filled["p1"], "answer_a": filled["a1"],
                     "answer_b": filled["b1"], "choice": "a", "comment": "", "who": ann},
        rating: {"request_id": "raw-000002", "answer_id": filled["a1"], "overall": 3, **dict.fromkeys(DIMENSIONS, 3),
                 "comment": "", "who": ann},
        annotator: {"name": "bob"},
        prompt: {"key": "raw-key", "queued": 1},
        answer: {"prompt_id": filled["p3"], "slot": "a", "finished": 1},
    }
    # Each bad row is the good one with one change; the good rows go in last, to show they pass.
    bad = [
        (comparison, {"choice": "c"}, "CHECK"), (comparison, {"answer_b": filled["a1"]}, "CHECK"),
        (comparison, {"comment": "x" * (MAX_COMMENT + 1)}, "CHECK"),
        (rating, {"overall": 0}, "CHECK"), (rating, {"overall": 6}, "CHECK"), (rating, {"consistency": 0}, "CHECK"),
        (rating, {"relevance": 9}, "CHECK"), (rating, {"comment": "x" * (MAX_COMMENT + 1)}, "CHECK"),
        (rating, {"request_id": "request-0001"}, "UNIQUE"),
        (annotator, {"name": ""}, "CHECK"), (annotator, {"name": "x" * (MAX_NAME + 1)}, "CHECK"),
        (annotator, {"name": "ann"}, "UNIQUE"),
        (prompt, {"queued": 2}, "CHECK"), (prompt, {"key": canonical(user("one"))}, "UNIQUE"),
        (answer, {"slot": "c"}, "CHECK"), (answer, {"finished": 2}, "CHECK"),
        (answer, {"prompt_id": filled["p1"]}, "UNIQUE"),
    ]
    con = sqlite3.connect(store.path)
    try:
        for sql, change, kind in bad:
            with pytest.raises(sqlite3.IntegrityError, match=f"{kind} constraint failed"):
                con.execute(sql, {**good[sql], **change})
        for sql, values in good.items():
            con.execute(sql, values)
        con.commit()
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE constraint failed: comparisons.request_id"):
            con.execute(comparison, {**good[comparison], "answer_a": filled["b1"], "answer_b": filled["a1"]})
    finally:
        con.close()
    assert count(store, "comparisons") == 1 and count(store, "ratings") == 2 and count(store, "annotators") == 2


# ------------------------------------------------------------------------------------ the next task
def test_next_to_compare_in_queue_order_per_annotator(filled, store):
    p1, p2, p3 = filled["p1"], filled["p2"], filled["p3"]
    assert store.next_to_compare("ann") == p1  # p3 has no pair yet; the chat prompt is not queued
    store.add_comparison("request-0001", p1, filled["a1"], filled["b1"], "a", "ann")
    assert store.next_to_compare("ann") == p2
    assert store.next_to_compare("bob") == p1  # ann's work does not hide it from bob
    assert store.next_to_compare(" ann ") == p2  # the name as stored (trimmed)
    store.add_comparison("request-0002", p2, filled["b2"], filled["a2"], "tie", "ann")
    assert store.next_to_compare("ann") is None
    add_pair(store, p3)
    assert store.next_to_compare("ann") == p3
    with pytest.raises(FeedbackError, match="annotator must be a name"):
        store.next_to_compare("")


def test_next_to_rate_in_queue_then_slot_order_per_annotator(filled, store):
    a1, b1, a2, b2 = filled["a1"], filled["b1"], filled["a2"], filled["b2"]
    assert store.next_to_rate("ann") == a1
    store.add_rating("request-0001", b1, SCORES, "ann")  # out of order: a1 is still first
    assert store.next_to_rate("ann") == a1
    store.add_rating("request-0002", a1, SCORES, "ann")
    assert store.next_to_rate("ann") == a2
    assert store.next_to_rate("bob") == a1
    store.add_rating("request-0003", a2, SCORES, "ann")
    store.add_rating("request-0004", b2, SCORES, "ann")
    store.add_rating("request-0005", filled["chat"], SCORES, "ann")  # chat answers are rated on request only
    assert store.next_to_rate("ann") is None


def test_progress_counters(filled, store):
    empty = {"prompts": 3, "pairs_ready": 2, "comparisons": 0, "ratings": 0, "comparisons_saved": 0,
             "ratings_saved": 0, "comparisons_undone": 0, "ratings_undone": 0, "chat_answers": 1, "annotators": [],
             "answers_to_rate": 4}
    assert store.progress() == empty
    assert store.progress("ann") == {**empty, "you": {"name": "ann", "comparisons": 0, "ratings": 0, "to_compare": 2,
                                                      "to_rate": 4}}
    store.add_comparison("request-0001", filled["p1"], filled["a1"], filled["b1"], "a", "ann")
    store.add_comparison("request-0002", filled["p2"], filled["a2"], filled["b2"], "b", "ann")
    store.add_comparison("request-0003", filled["p1"], filled["b1"], filled["a1"], "tie", "bob")
    store.add_rating("request-0004", filled["a1"], SCORES, "bob")
    store.add_rating("request-0004", filled["a1"], SCORES, "bob")  # a resubmission counts once
    store.add_rating("request-0005", filled["chat"], SCORES, "cy")
    add_pair(store, filled["p3"])
    # 3 queued prompts, all 3 pairs now ready (6 answers to rate); 3 comparisons (ann 2, bob 1);
    # 2 ratings (bob 1, cy 1); one chat answer; annotators sorted by name.
    assert store.progress("bob") == {
        "prompts": 3, "pairs_ready": 3, "comparisons": 3, "ratings": 2, "comparisons_saved": 3, "ratings_saved": 2,
        "comparisons_undone": 0, "ratings_undone": 0, "chat_answers": 1, "answers_to_rate": 6,
        "annotators": [{"name": "ann", "comparisons": 2, "ratings": 0}, {"name": "bob", "comparisons": 1, "ratings": 1},
                       {"name": "cy", "comparisons": 0, "ratings": 1}],
        "you": {"name": "bob", "comparisons": 1, "ratings": 1, "to_compare": 2, "to_rate": 5}}
    [one, two, three] = store.queue()
    assert [(q["n_answers"], q["n_comparisons"], q["n_ratings"]) for q in (one, two, three)] == [
        (2, 2, 1), (2, 1, 0), (2, 0, 0)]
    # ann re-judges p1 and bob re-rates a1: the Queue still counts each person's judgement of an item once
    store.add_comparison("request-0006", filled["p1"], filled["a1"], filled["b1"], "b", "ann")
    store.add_rating("request-0007", filled["a1"], SCORES, "bob")
    assert [(q["n_comparisons"], q["n_ratings"]) for q in store.queue()] == [(2, 1), (1, 0), (0, 0)]


# ------------------------------------------------------------------------------------ export rows
def test_comparison_rows(filled, store):
    store.add_comparison("request-0001", filled["p1"], filled["b1"], filled["a1"], "b", "ann", "a is clearer")
    store.add_comparison("request-0002", filled["p2"], filled["a2"], filled["b2"], "tie", "bob")
    rows = store.comparison_rows()
    for row in rows:
        assert isinstance(row.pop("created_at"), float)
    assert rows == [
        {"id": 1, "choice": "b", "comment": "a is clearer", "annotator": "ann", "prompt": user("one"),
         "answer_a": "one b", "model_a": "m2", "answer_b": "one a", "model_b": "m1"},
        {"id": 2, "choice": "tie", "comment": "", "annotator": "bob", "prompt": user("two"),
         "answer_a": "two a", "model_a": "m1", "answer_b": "two b", "model_b": "m2"},
    ]


def test_rating_rows(filled, store):
    store.add_rating("request-0001", filled["b1"], SCORES, "ann", "cut short")
    store.add_rating("request-0002", filled["chat"], {k: 1 for k in SCORES}, "bob")
    rows = store.rating_rows()
    for row in rows:
        assert isinstance(row.pop("created_at"), float)
    assert rows == [
        {"id": 1, **SCORES, "comment": "cut short", "annotator": "ann", "prompt": user("one"), "response": "one b",
         "model": "m2", "finished": 0},
        {"id": 2, **{k: 1 for k in SCORES}, "comment": "", "annotator": "bob", "prompt": user("chat"),
         "response": "chat answer", "model": "m1", "finished": 1},
    ]


# ------------------------------------------------------------------------------------ concurrency
N_PROCESSES, N_EACH = 4, 50


def _rate_many(path: str, answer_id: int, worker: int, barrier) -> None:
    """One annotator's process: 50 ratings, each its own transaction, started with the others at once."""
    store = FeedbackStore(path)
    barrier.wait(timeout=60)
    for i in range(N_EACH):
        store.add_rating(f"proc{worker}-request{i:04d}", answer_id, {**SCORES, "overall": 1 + i % 5}, f"ann{worker}")


def test_processes_writing_at_once_lose_nothing(filled, store):
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing shared but the file
    barrier = ctx.Barrier(N_PROCESSES)
    procs = [ctx.Process(target=_rate_many, args=(str(store.path), filled["a1"], k, barrier))
             for k in range(N_PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * N_PROCESSES  # no 'database is locked' in any writer
    assert count(store, "ratings") == N_PROCESSES * N_EACH
    assert store.integrity_check() == "ok"
    con = sqlite3.connect(store.path)
    try:  # every rating row is kept (the history); the counters count each person's rated answer once
        per_person = con.execute("SELECT n.name, count(*) FROM ratings r JOIN annotators n ON n.id = r.annotator_id"
                                 " GROUP BY n.name ORDER BY n.name").fetchall()
    finally:
        con.close()
    assert per_person == [(f"ann{k}", N_EACH) for k in range(N_PROCESSES)]
    assert sorted((a["name"], a["ratings"]) for a in store.progress()["annotators"]) == [
        (f"ann{k}", 1) for k in range(N_PROCESSES)]


# ------------------------------------------------------------------------------------ undo
def retractions(store: FeedbackStore) -> list[tuple]:
    con = sqlite3.connect(store.path)
    try:
        return con.execute("SELECT request_id, kind, judgement_id FROM retractions ORDER BY id").fetchall()
    finally:
        con.close()


def test_undo_last_comparison_twice_then_nothing_left(filled, store):
    """ann compares p1 (id 1) and p2 (id 2), bob p1 (id 3). ann's first undo retracts id 2, her second id 1;
    bob's vote stays. By hand after the first undo: in force ids 1, 3 -> distinct (annotator, prompt) 2, ann 1
    compared and 1 to compare (p2, her next); the Queue counts p1 2, p2 0; the 3 rows all stay in the file."""
    p1, p2 = filled["p1"], filled["p2"]
    store.add_comparison("request-0001", p1, filled["a1"], filled["b1"], "a", "ann")
    store.add_comparison("request-0002", p2, filled["a2"], filled["b2"], "b", "ann")
    store.add_comparison("request-0003", p1, filled["b1"], filled["a1"], "tie", "bob")
    assert store.last_judgement("ann", "comparison") == {"id": 2, "prompt_id": p2, "answer_id": None}
    assert store.undo_last("undo-0001", "ann", "comparison") == Undone("comparison", 2, p2, None, True)
    # the same form sent again retracts nothing more
    assert store.undo_last("undo-0001", "ann", "comparison") == Undone("comparison", 2, p2, None, False)
    assert retractions(store) == [("undo-0001", "comparison", 2)]
    progress = store.progress("ann")
    assert (progress["comparisons"], progress["comparisons_saved"], progress["comparisons_undone"]) == (2, 2, 1)
    assert progress["you"] == {"name": "ann", "comparisons": 1, "ratings": 0, "to_compare": 1, "to_rate": 4}
    assert store.next_to_compare("ann") == p2  # the undone item comes back
    assert [r["id"] for r in store.comparison_rows()] == [1, 3]
    assert [q["n_comparisons"] for q in store.queue()] == [2, 0, 0]
    assert count(store, "comparisons") == 3  # append-only: the undone row is still there

    assert store.undo_last("undo-0002", "ann", "comparison") == Undone("comparison", 1, p1, None, True)
    assert store.progress("ann")["you"]["to_compare"] == 2 and store.next_to_compare("ann") == p1
    assert [r["annotator"] for r in store.comparison_rows()] == ["bob"]
    assert store.last_judgement("ann", "comparison") is None and store.last_judgement("bob", "comparison")["id"] == 3
    with pytest.raises(FeedbackError, match="kind: ann has no comparison to undo .*; save a comparison first"):
        store.undo_last("undo-0003", "ann", "comparison")
    assert len(retractions(store)) == 2


def test_undo_last_rating_brings_the_answer_back(filled, store):
    """ann rates b1 (id 1) then a1 (id 2): undo retracts id 2 (a1), so a1 is her next answer again and
    only b1's rating is exported; her progress: 1 rated, 3 of 4 to rate."""
    store.add_rating("request-0001", filled["b1"], SCORES, "ann")
    store.add_rating("request-0002", filled["a1"], SCORES, "ann")
    assert store.next_to_rate("ann") == filled["a2"]
    undone = store.undo_last("undo-0001", "ann", "rating")
    assert undone == Undone("rating", 2, filled["p1"], filled["a1"], True)
    assert store.next_to_rate("ann") == filled["a1"]
    assert [r["response"] for r in store.rating_rows()] == ["one b"]
    progress = store.progress("ann")
    assert (progress["ratings"], progress["ratings_saved"], progress["ratings_undone"]) == (1, 1, 1)
    assert progress["you"]["ratings"] == 1 and progress["you"]["to_rate"] == 3
    assert [q["n_ratings"] for q in store.queue()] == [1, 0, 0]
    with pytest.raises(FeedbackError, match="ann has no comparison to undo"):  # kinds are undone apart
        store.undo_last("undo-0002", "ann", "comparison")


def test_undoing_a_re_judgement_restores_the_earlier_vote(filled, store):
    p1 = filled["p1"]
    store.add_comparison("request-0001", p1, filled["a1"], filled["b1"], "a", "ann")
    store.add_comparison("request-0002", p1, filled["a1"], filled["b1"], "b", "ann")  # changed her mind
    store.undo_last("undo-0001", "ann", "comparison")
    assert [(r["id"], r["choice"]) for r in store.comparison_rows()] == [(1, "a")]  # her first vote counts again
    assert store.progress("ann")["you"]["comparisons"] == 1 and store.next_to_compare("ann") == filled["p2"]


@pytest.mark.parametrize(("args", "message"), [
    (("undo-0001", "ann", "comparisons"), "kind must be one of comparison, rating, got 'comparisons'"),
    (("undo-0001", "ann", ["rating"]), "kind must be one of comparison, rating, got \\['rating'\\]"),
    (("short", "ann", "rating"), "request_id must be a client-made id of 8-64 printable characters"),
    (("undo-0001", "", "rating"), "annotator must be a name of 1-64 printable characters"),
    (("undo-0001", "nobody", "rating"), "kind: nobody has no rating to undo"),
    (("request-0001", "ann", "comparison"), "request_id 'request-0001' already undid a rating, not a comparison"),
])
def test_undo_refusals_name_the_field(filled, store, args, message):
    store.add_rating("request-0000", filled["a1"], SCORES, "ann")
    store.add_comparison("request-0002", filled["p1"], filled["a1"], filled["b1"], "a", "ann")
    store.undo_last("request-0001", "ann", "rating")
    with pytest.raises(FeedbackError, match=message):
        store.undo_last(*args)
    assert retractions(store) == [("request-0001", "rating", 1)]


def test_retraction_constraints_hold_for_raw_sql(filled, store):
    """A hand-written retraction must name a judgement of its kind by its annotator, once."""
    store.add_comparison("request-0001", filled["p1"], filled["a1"], filled["b1"], "a", "ann")
    store.add_rating("request-0002", filled["a1"], SCORES, "bob")
    ann, bob = store.annotator_id("ann"), store.annotator_id("bob")
    sql = ("INSERT INTO retractions (request_id, kind, judgement_id, annotator_id, created_at)"
           " VALUES (:request_id, :kind, :judgement_id, :who, 0)")
    good = {"request_id": "raw-000001", "kind": "comparison", "judgement_id": 1, "who": ann}
    con = sqlite3.connect(store.path)
    try:
        for change, error in [({"kind": "rating"}, "retractions.judgement_id must be a comparison or rating"),
                              ({"who": bob}, "retractions.judgement_id must be"),
                              ({"judgement_id": 99}, "retractions.judgement_id must be"),
                              ({"kind": "vote"}, "judgement_id must be a comparison or rating")]:  # the trigger runs first
            with pytest.raises(sqlite3.IntegrityError, match=error):
                con.execute(sql, {**good, **change})
        con.execute(sql, good)
        con.execute(sql, {**good, "request_id": "raw-000002", "kind": "rating", "who": bob})
        con.commit()
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE constraint failed: retractions.kind"):
            con.execute(sql, {**good, "request_id": "raw-000003"})  # the same comparison twice
    finally:
        con.close()
    assert store.comparison_rows() == [] and store.rating_rows() == []


# ------------------------------------------------------------------------------------ schema version 1 -> 2
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE prompts (id INTEGER PRIMARY KEY, messages TEXT NOT NULL, key TEXT NOT NULL UNIQUE, source TEXT NOT NULL,
    queued INTEGER NOT NULL CHECK (queued IN (0, 1)), created_at REAL NOT NULL);
CREATE TABLE answers (id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    slot TEXT CHECK (slot IN ('a', 'b')), model TEXT NOT NULL, text TEXT NOT NULL,
    finished INTEGER NOT NULL CHECK (finished IN (0, 1)), settings TEXT NOT NULL, created_at REAL NOT NULL,
    UNIQUE (prompt_id, slot));
CREATE TABLE annotators (id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64), created_at REAL NOT NULL);
CREATE TABLE comparisons (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id), answer_a INTEGER NOT NULL REFERENCES answers(id),
    answer_b INTEGER NOT NULL REFERENCES answers(id), choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie')),
    comment TEXT NOT NULL DEFAULT '' CHECK (length(comment) <= 4000),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id), created_at REAL NOT NULL, CHECK (answer_a != answer_b));
CREATE TABLE ratings (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE,
    answer_id INTEGER NOT NULL REFERENCES answers(id),
    overall INTEGER NOT NULL CHECK (overall IN (1, 2, 3, 4, 5)),
    consistency INTEGER NOT NULL CHECK (consistency IN (1, 2, 3, 4, 5)),
    engagingness INTEGER NOT NULL CHECK (engagingness IN (1, 2, 3, 4, 5)),
    safety INTEGER NOT NULL CHECK (safety IN (1, 2, 3, 4, 5)), relevance INTEGER NOT NULL CHECK (relevance IN (1, 2, 3, 4, 5)),
    comment TEXT NOT NULL DEFAULT '' CHECK (length(comment) <= 4000),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id), created_at REAL NOT NULL);
CREATE INDEX answers_prompt ON answers(prompt_id);
CREATE INDEX comparisons_annotator ON comparisons(annotator_id, prompt_id);
CREATE INDEX ratings_annotator ON ratings(annotator_id, answer_id);
INSERT INTO meta VALUES ('schema_version', '{version}');
INSERT INTO prompts VALUES (1, '[{{"role": "user", "content": "old"}}]', '[{{"content":"old","role":"user"}}]', 'v1.jsonl', 1, 0);
INSERT INTO answers VALUES (1, 1, 'a', 'm1', 'old a', 1, '{{}}', 0), (2, 1, 'b', 'm2', 'old b', 1, '{{}}', 0);
INSERT INTO annotators VALUES (1, 'ann', 0), (2, 'bob', 0);
INSERT INTO comparisons VALUES (1, 'v1-request-1', 1, 1, 2, 'a', '', 1, 0), (2, 'v1-request-2', 1, 2, 1, 'b', '', 2, 0);
INSERT INTO ratings VALUES (1, 'v1-request-3', 2, 2, 3, 3, 3, 3, 'meh', 1, 0);
"""
"""A database as the version-1 app wrote it (its SCHEMA, literally), with two comparisons and a rating."""


def v1_database(path, version: int = 1):
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(V1_SCHEMA.format(version=version))
    con.close()
    return path


def test_a_version_1_database_opens_migrated_and_reads_as_before(tmp_path):
    path = v1_database(tmp_path / "v1.db")
    store = FeedbackStore(path)
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
        assert con.execute("SELECT count(*) FROM retractions").fetchone()[0] == 0
    finally:
        con.close()
    assert [p["messages"] for p in store.queue()] == [user("old")]
    assert [(r["annotator"], r["choice"], r["answer_a"]) for r in store.comparison_rows()] == [
        ("ann", "a", "old a"), ("bob", "b", "old b")]
    assert [(r["annotator"], r["overall"], r["comment"]) for r in store.rating_rows()] == [("ann", 2, "meh")]
    assert store.progress("ann")["you"] == {"name": "ann", "comparisons": 1, "ratings": 1, "to_compare": 0,
                                            "to_rate": 1}
    # and it works as a version-2 database: undo, new judgements, reopening (no second migration)
    assert store.undo_last("undo-0001", "ann", "comparison") == Undone("comparison", 1, 1, None, True)
    assert store.next_to_compare("ann") == 1
    store.add_comparison("request-0001", 1, 1, 2, "tie", "ann")
    assert [r["id"] for r in FeedbackStore(path).comparison_rows()] == [2, 3]
    assert FeedbackStore(path).integrity_check() == "ok"


def test_a_newer_database_is_refused_before_anything_is_written(tmp_path):
    path = v1_database(tmp_path / "v3.db", version=3)
    with pytest.raises(FeedbackError, match="has schema version 3, newer than this chatrlhf \\(2\\); upgrade chatrlhf"):
        FeedbackStore(path)
    con = sqlite3.connect(path)
    try:  # not half-migrated: no table of ours was added to the newer file
        assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'retractions'").fetchone()[0] == 0
    finally:
        con.close()
