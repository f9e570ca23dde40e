"""End to end in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): a person imports prompts,
compares a pair, rates an answer, chats, and finds the feedback in the export; markup in a prompt or a model
answer is shown as text and runs nothing; with a token, nothing is served without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from feedback_server import CHROMIUM, Server

from chatrlhf.feedback.store import FeedbackStore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/test.sh installs it)"),
]
MARKUP = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
PROMPTS = ["What is the capital of France?", f"Repeat this exactly: {MARKUP}", "Name three colours."]


@pytest.fixture()
def server(tmp_path):
    srv = Server(tmp_path / "feedback.db", log=tmp_path / "serve.log")
    yield srv
    srv.stop()


def _page(browser):
    page = browser.new_page()
    page.set_default_timeout(60_000)
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    return page, errors


def test_import_compare_rate_chat_export(browser, server, tmp_path):
    page, errors = _page(browser)
    page.goto(server.url)
    page.fill("#annotator", "alice")
    page.click("text=Save")
    assert page.inner_text("#annotator-name") == "alice"

    # Import a prompt file through the queue page's upload form.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    page.click("nav >> text=Queue")
    page.set_input_files("#prompt-file", str(prompts))
    page.click("#import")
    assert "Imported 3 new prompts" in page.inner_text("#imported")

    # Compare: the page waits (reloading itself) until the background worker has answered prompt 1.
    page.click("nav >> text=Compare")
    page.wait_for_selector("#choose-a")
    assert PROMPTS[0] in page.inner_text("section.prompt")
    page.fill("textarea[name=comment]", "A is clearer")
    page.click("#choose-a")
    page.wait_for_selector("#saved")
    assert page.inner_text("#my-comparisons") == "1"
    # The next pair is the prompt holding markup: shown as text, nothing ran.
    page.wait_for_selector("#choose-b")
    assert MARKUP in page.inner_text("section.prompt")
    assert page.evaluate("window.__pwned") is None

    # Rate the first answer of the queue: overall 4 and each dimension, with a comment.
    page.click("nav >> text=Rate")
    page.wait_for_selector("#save-rating")
    for dim, value in {"overall": 4, "consistency": 5, "engagingness": 3, "safety": 5, "relevance": 4}.items():
        page.check(f"#{dim}-{value}")
    page.fill("textarea[name=comment]", "fine answer")
    page.click("#save-rating")
    page.wait_for_selector("#saved")
    assert page.inner_text("#my-ratings") == "1"

    # A model answer holding markup (written straight to the database, as a model could have written it).
    store = FeedbackStore(tmp_path / "feedback.db")
    answer_id = store.add_answer(2, "tiny-random-llama", f"Sure: {MARKUP}", True, {})
    page.goto(f"{server.base}/rate?answer_id={answer_id}")
    assert MARKUP in page.inner_text("#answer .text")
    assert page.evaluate("window.__pwned") is None

    # Chat: the answer appears, and the chat answer can be rated.
    page.click("nav >> text=Chat")
    page.fill("#chat-input", "Hello there")
    page.press("#chat-input", "Enter")
    page.wait_for_selector(".msg.assistant .rate-link")
    assert page.inner_text(".msg.user .text") == "Hello there"
    assert page.is_enabled("#chat-send") and page.is_hidden("#chat-busy")
    page.click(".rate-link")  # rated beside the conversation, or on the Rate page
    page.click("form.inline-rating .rate-page")
    page.wait_for_selector("#save-rating")
    assert "Hello there" in page.inner_text("section.prompt")

    # Export: both judgements are in the downloads.
    page.click("nav >> text=Export")
    comparisons = _jsonl(page.request.get(f"{server.base}/export/comparisons.jsonl").text())
    ratings = _jsonl(page.request.get(f"{server.base}/export/ratings.jsonl").text())
    assert [(c["annotator"], c["choice"], c["comment"]) for c in comparisons] == [("alice", "a", "A is clearer")]
    assert comparisons[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]}]
    assert [(r["annotator"], r["score"], r["consistency"], r["engagingness"], r["comment"]) for r in ratings] == [
        ("alice", 4, 5, 3, "fine answer")]
    assert ratings[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]}]
    page.screenshot(path=str(tmp_path / "export.png"), full_page=True)
    assert errors == []


def test_token_required(browser, tmp_path):
    token = "t0ken-for-the-browser-test"
    srv = Server(tmp_path / "feedback.db", "--token", token, log=tmp_path / "serve.log")
    try:
        page, _ = _page(browser)
        response = page.goto(srv.base + "/")
        assert response.status == 401 and "access token" in page.inner_text("body")
        assert page.goto(srv.base + "/static/app.js").status == 401
        page.goto(f"{srv.base}/?token={token}")  # the printed URL: the token becomes a cookie
        assert page.url == srv.base + "/"
        assert page.goto(srv.base + "/queue").status == 200
    finally:
        srv.stop()


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
