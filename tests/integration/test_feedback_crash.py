"""A server killed with SIGKILL while annotators are saving loses no rating or comparison it acknowledged.

Two ``chatrlhf serve`` processes share one database (two rooms of annotators); six client threads save
ratings and comparisons through them as fast as they can. One server is SIGKILLed mid-stream, then the
other. Every request answered 201 must be in the database afterwards, the file must pass SQLite's
integrity check, and a restarted server must serve the same counts and go on saving.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from feedback_server import Server

from chatrlhf.feedback.store import FeedbackStore

pytestmark = pytest.mark.slow
SCORES = {"overall": 4, "consistency": 3, "engagingness": 2, "safety": 5, "relevance": 4}


def _post(base: str, path: str, body: dict) -> int:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status


def _annotate(base: str, name: str, pair: tuple[int, int, int], acked: dict, stop: threading.Event) -> None:
    """Saves ratings (even n) and comparisons (odd n) until ``stop`` or until the server is gone."""
    prompt_id, a, b = pair
    n = 0
    while not stop.is_set():
        request_id = f"{name}-{n:06d}"
        try:
            if n % 2 == 0:
                status = _post(base, "/rate", {"request_id": request_id, "answer_id": a, "annotator": name, **SCORES})
            else:
                status = _post(base, "/compare", {"request_id": request_id, "prompt_id": prompt_id, "answer_a": a,
                                                   "answer_b": b, "choice": "ab"[n % 4 // 2], "annotator": name})
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return  # the server died under us: this request was never acknowledged
        assert status == 201, status
        acked["ratings" if n % 2 == 0 else "comparisons"].append(request_id)
        n += 1


def _request_ids(store: FeedbackStore, table: str) -> set[str]:
    with store._read() as con:  # noqa: SLF001 - the test reads the raw rows it checks
        return {r[0] for r in con.execute(f"SELECT request_id FROM {table}")}


def test_sigkill_loses_no_acknowledged_rating(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    store.add_prompts([[{"role": "user", "content": "Say something kind."}]], source="test")
    a = store.add_answer(1, "m", "You are doing great.", True, {}, slot="a")
    b = store.add_answer(1, "m", "Whatever.", True, {}, slot="b")
    servers = [Server(db, "--pregenerate", "false", log=tmp_path / f"serve{i}.log") for i in range(2)]
    acked = {"ratings": [], "comparisons": []}
    stop = threading.Event()
    threads = [threading.Thread(target=_annotate, args=(servers[i % 2].base, f"annotator{i}", (1, a, b), acked, stop))
               for i in range(6)]
    try:
        for t in threads:
            t.start()
        while len(acked["ratings"]) + len(acked["comparisons"]) < 60:  # well into the stream of writes
            assert any(t.is_alive() for t in threads), "every client stopped before the kill"
            time.sleep(0.05)
        servers[0].proc.send_signal(signal.SIGKILL)
        time.sleep(1.0)  # the other server keeps saving meanwhile
        servers[1].proc.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert servers[0].proc.wait(10) == -signal.SIGKILL and servers[1].proc.wait(10) == -signal.SIGKILL
    finally:
        stop.set()
        for s in servers:
            s.stop()

    store = FeedbackStore(db)
    assert store.integrity_check() == "ok"
    for table in ("ratings", "comparisons"):
        missing = set(acked[table]) - _request_ids(store, table)
        assert not missing, f"{len(missing)} acknowledged {table} lost: {sorted(missing)[:5]}"
    saved = len(_request_ids(store, "ratings")), len(_request_ids(store, "comparisons"))
    assert saved[0] >= len(acked["ratings"]) > 10 and saved[1] >= len(acked["comparisons"]) > 10
    # At most one request per client thread was saved but not acknowledged (the kill fell between the two).
    assert sum(saved) - len(acked["ratings"]) - len(acked["comparisons"]) <= len(threads)

    # A restarted server sees everything and goes on saving.
    server = Server(db, "--pregenerate", "false", log=tmp_path / "serve-again.log")
    try:
        with urllib.request.urlopen(server.base + "/api/progress", timeout=30) as response:
            progress = json.load(response)
        assert (progress["ratings_saved"], progress["comparisons_saved"]) == saved
        assert _post(server.base, "/rate", {"request_id": "after-restart", "answer_id": b, "annotator": "x",
                                            **SCORES}) == 201
    finally:
        server.stop()
