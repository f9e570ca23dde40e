"""The feedback app used as an annotator uses it, in headless Chromium against a real ``chatrlhf serve``. The bugs
(each test failed before its fix, but the error-page one): a held shortcut key votes once, a link opened before
giving a name lands where it pointed, bad queries get the app's own error page, a re-judged item counts once, the
queue pages past 1,000 prompts and searches, a chat turn's prompt can be compared, and without pre-generation a
page waits for its pair instead of blocking. Then the workflow: comment-then-choose, Skip and the guidelines,
keyboard rating, pasted prompts, the Export page, Markdown with its raw text, the chat kept while rating, and
every page at desktop and phone sizes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from feedback_server import CHROMIUM, Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/test.sh installs it)"),
]


@pytest.fixture()
def server(tmp_path):
    srv = Server(tmp_path / "feedback.db", log=tmp_path / "serve.log")
    yield srv
    srv.stop()


def named_page(browser, srv, name: str = "alice"):
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(srv.base + "/")
    page.fill("#annotator", name)
    page.click("text=Save")
    return page


def add_prompts(page, srv, prompts: list[str]) -> None:
    response = page.request.post(srv.base + "/queue", data={"prompts": prompts})
    assert response.status == 201, response.text()


def wait_for_prompt(page, changed_from: str | None = None, equal_to: str | None = None) -> None:
    """Until the Compare page shows another prompt (or a given one): polled from here, since the page's CSP
    forbids the string evaluation ``wait_for_function`` uses."""
    value = None
    for _ in range(600):
        try:
            value = page.locator("input[name=prompt_id]").first.get_attribute("value", timeout=60_000)
        except Exception:  # noqa: BLE001 - the page is navigating: read again
            value = None
        if value is not None and (value != changed_from if changed_from is not None else value == equal_to):
            return
        time.sleep(0.1)
    raise AssertionError(f"the Compare page still shows prompt {value}")


def progress(page, srv) -> dict:
    return page.request.get(srv.base + "/api/progress").json()


def test_a_held_shortcut_key_votes_once(browser, server):
    page = named_page(browser, server)
    add_prompts(page, server, [f"Question number {i}?" for i in range(6)])
    page.goto(server.base + "/compare")
    page.wait_for_selector("#choose-a")
    first = page.input_value("input[name=prompt_id]")
    page.keyboard.down("1")  # pressed: one vote, then the next prompt's page loads
    wait_for_prompt(page, changed_from=first)
    page.wait_for_selector("#choose-a")
    for _ in range(10):  # still held: the key repeats on a page the annotator has not read
        page.keyboard.down("1")
        time.sleep(0.05)
    page.keyboard.up("1")
    time.sleep(1.0)
    assert progress(page, server)["comparisons_saved"] == 1  # one vote saved in all


def test_a_link_opened_before_giving_a_name_lands_where_it_pointed(browser, server):
    setup = named_page(browser, server, "setup")
    add_prompts(setup, server, ["First prompt?", "Second prompt?", "Third prompt?"])
    chat = setup.request.post(server.base + "/api/chat", data={"messages": [{"role": "user", "content": "Hi!"}]})
    answer_id = chat.json()["answer_id"]
    fresh = browser.new_context().new_page()  # no name cookie yet
    fresh.goto(f"{server.base}/rate?answer_id={answer_id}")
    fresh.fill("#annotator", "bob")
    fresh.click("text=Save")
    fresh.wait_for_selector("#save-rating")
    assert fresh.url == f"{server.base}/rate?answer_id={answer_id}"
    assert fresh.input_value("input[name=answer_id]") == str(answer_id)


def test_bad_queries_get_the_apps_error_page(browser, server):
    page = named_page(browser, server)
    for url, field in (("/compare?prompt_id=abc", "prompt_id"), ("/export?min_margin=&min_agreement=1", "min_margin")):
        response = page.goto(server.base + url)
        assert response.status == 400
        body = page.inner_text("main")
        assert field in body and '"detail"' not in body and page.is_visible("nav"), body


def test_a_rejudged_item_counts_once(browser, server):
    page = named_page(browser, server)
    add_prompts(page, server, ["Which is better?"])
    for choice in ("#choose-a", "#choose-b"):
        page.goto(server.base + "/compare?prompt_id=1")
        page.click(choice)
        page.wait_for_selector("text=Saved.")
    assert page.inner_text("#my-comparisons") == "1"
    counts = progress(page, server)
    assert counts["comparisons"] == 1 and counts["you"]["comparisons"] == 1 and counts["comparisons_saved"] == 2


def test_the_queue_pages_past_a_thousand_prompts_and_searches(browser, server):
    page = named_page(browser, server)
    add_prompts(page, server, [f"Prompt {i:04d} about {'cats' if i % 100 == 7 else 'dogs'}" for i in range(1205)])
    page.goto(server.base + "/queue")
    assert "1205 prompts" in page.inner_text("#queue-pages")
    page.click("#queue-next")
    page.wait_for_selector("text=Prompt 0100 about dogs")
    page.goto(server.base + "/queue?page=13")
    page.wait_for_selector("text=Prompt 1204 about dogs")
    page.fill("#queue-search", "cats")
    page.press("#queue-search", "Enter")
    page.wait_for_selector("text=Prompt 1107 about cats")
    rows = page.locator("table.queue tr.prompt-row")
    assert rows.count() == 12  # prompts 7, 107, ..., 1107


def test_a_chat_turns_prompt_can_be_compared(browser, server):
    page = named_page(browser, server)
    chat = page.request.post(server.base + "/api/chat", data={"messages": [{"role": "user", "content": "Hello?"}]})
    prompt_id = chat.json()["prompt_id"]
    page.goto(f"{server.base}/compare?prompt_id={prompt_id}")
    page.wait_for_selector("#choose-a", timeout=60_000)  # the waiting page reloads until the pair exists
    assert page.input_value("input[name=prompt_id]") == str(prompt_id)


def test_without_pregeneration_a_page_waits_for_its_pair(browser, tmp_path):
    srv = Server(tmp_path / "feedback.db", "--pregenerate", "false", log=tmp_path / "serve.log")
    try:
        page = named_page(browser, srv)
        add_prompts(page, srv, ["Only prompt?"])
        time.sleep(1.0)
        assert progress(page, srv)["pairs_ready"] == 0  # nothing generated ahead
        page.goto(srv.base + "/compare")
        assert page.is_visible("#waiting")  # answered at once: the pair is generated in the background
        page.wait_for_selector("#choose-a")
    finally:
        srv.stop()


def test_comment_then_choose_skip_and_the_guidelines(browser, tmp_path):
    guide = tmp_path / "guidelines.txt"
    guide.write_text("Prefer answers that cite the manual.\nNever prefer rudeness.")
    srv = Server(tmp_path / "feedback.db", "--guidelines", str(guide), log=tmp_path / "serve.log")
    try:
        page = named_page(browser, srv)
        add_prompts(page, srv, ["First?", "Second?", "Third?"])
        page.goto(srv.base + "/compare")
        page.wait_for_selector("#choose-a")
        page.click("#guidelines summary")
        assert "Prefer answers that cite the manual." in page.inner_text("#guidelines")
        # the comment box comes before the buttons that save: typed first, saved with the choice
        order = page.evaluate("document.querySelector('textarea[name=comment]').compareDocumentPosition("
                              "document.getElementById('choose-a')) & Node.DOCUMENT_POSITION_FOLLOWING")
        assert order
        assert page.input_value("input[name=prompt_id]") == "1"
        page.keyboard.press("s")  # skip prompt 1: nothing saved, prompt 2 next
        wait_for_prompt(page, equal_to="2")
        page.fill("textarea[name=comment]", "B is more precise")
        page.click("#choose-b")
        page.wait_for_selector("#saved")
        assert page.input_value("input[name=prompt_id]") == "3"  # then prompt 3; the skipped one comes back last
        rows = [r for r in page.request.get(srv.base + "/export/comparisons.jsonl").text().splitlines() if r]
        assert len(rows) == 1 and '"B is more precise"' in rows[0] and '"choice": "b"' in rows[0]
    finally:
        srv.stop()


@pytest.mark.parametrize("width,height", [(1366, 768), (390, 844)])
def test_every_page_fits_the_screen(browser, server, width, height):
    page = named_page(browser, server)
    add_prompts(page, server, ["A long prompt " + "with many words " * 40])
    chat = page.request.post(server.base + "/api/chat", data={"messages": [{"role": "user", "content": "Hi"}]})
    page.set_viewport_size({"width": width, "height": height})
    for path in ("/", "/compare", f"/rate?answer_id={chat.json()['answer_id']}", "/chat", "/queue", "/export"):
        page.goto(server.base + path)
        if path == "/compare":
            page.wait_for_selector("#choose-a")
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, (path, width, overflow)
        if path == "/compare":
            a, b = page.locator("#answer-a").bounding_box(), page.locator("#answer-b").bounding_box()
            stacked = b["y"] >= a["y"] + a["height"]
            assert stacked == (width < 700), (width, a, b)  # side by side on a desktop, stacked on a phone
            button = page.locator("#choose-a").bounding_box()
            assert button["height"] >= (44 if width < 700 else 20)


def test_rate_with_the_keyboard_and_large_targets(browser, server):
    page = named_page(browser, server)
    add_prompts(page, server, ["Rate me?"])
    page.goto(server.base + "/rate")
    page.wait_for_selector("#save-rating")
    assert page.inner_text("#item-name") == "prompt 1, answer A"  # not the database's answer id
    box = page.locator("label.pick").first.bounding_box()
    assert box["width"] >= 40 and box["height"] >= 36, box  # the whole cell is the click target
    for key in "4135":  # overall 4, consistency 1 -> 3 after Backspace, engagingness 5, then ...
        page.keyboard.press(key)
        if key == "1":
            page.keyboard.press("Backspace")
    page.keyboard.press("2")  # safety
    page.keyboard.press("4")  # relevance
    page.keyboard.press("Enter")
    page.wait_for_selector("#saved")
    [row] = [r for r in page.request.get(server.base + "/export/ratings.jsonl").text().splitlines() if r]
    for field in ('"score": 4', '"consistency": 3', '"engagingness": 5', '"safety": 2', '"relevance": 4'):
        assert field in row, row


def test_prompts_can_be_pasted_on_the_queue_page(browser, server):
    page = named_page(browser, server)
    page.goto(server.base + "/queue")
    page.fill("#prompt-text", "How do tides work?\n\n  Name a prime number.  \nHow do tides work?\n")
    page.click("#add-pasted")
    assert "Imported 2 new prompts (1 already present)" in page.inner_text("#imported")
    assert "prompts 1\u20132 of 2 prompts" in page.inner_text("#queue-pages")
    assert "Name a prime number." in page.inner_text("table.queue")


def test_export_downloads_above_the_fold_and_readable_counts(browser, server, tmp_path):
    page = named_page(browser, server)
    page.set_viewport_size({"width": 1366, "height": 768})
    page.goto(server.base + "/export")
    assert page.locator("#dl-pairs").bounding_box()["y"] + 20 < 768  # no scrolling to find the files
    stats = page.inner_text("#stats-comparisons")
    assert "dropped: annotators disagree" in stats and "dropped_disagreement" not in stats


def test_a_bad_prompt_file_gets_a_fix_for_the_web(browser, server, tmp_path):
    page = named_page(browser, server)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt field"}\n')
    page.goto(server.base + "/queue")
    page.set_input_files("#prompt-file", str(bad))
    page.click("#import")
    body = page.inner_text("main")
    assert "bad.jsonl line 2" in body and "paste the prompts" in body and "data.format" not in body, body


def test_answers_show_as_markdown_with_the_raw_text_a_click_away(browser, server, tmp_path):
    from chatrlhf.feedback.store import FeedbackStore

    page = named_page(browser, server)
    add_prompts(page, server, ["Show me code"])
    text = ("Use **this**:\n```python\nprint('<img src=x onerror=\"window.__pwned = 1\">')\n```\n"
            "- <script>window.__pwned = 2</script>\n- [link](javascript:window.__pwned=3)")
    answer_id = FeedbackStore(tmp_path / "feedback.db").add_answer(1, "m", text, True, {})
    page.goto(f"{server.base}/rate?answer_id={answer_id}")
    code = page.locator("#answer .md pre code")
    assert "print('<img src=x" in code.inner_text()
    assert "monospace" in code.evaluate("el => getComputedStyle(el).fontFamily")
    assert page.locator("#answer .md strong").inner_text() == "this"
    assert page.locator("#answer .md li").count() == 2 and page.locator("#answer a").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.is_hidden("#answer .raw")
    page.click("#raw-toggle")
    assert page.is_visible("#answer .raw") and page.is_hidden("#answer .md")
    assert page.inner_text("#answer .raw") == text


def test_the_chat_survives_rating_one_of_its_answers(browser, server):
    page = named_page(browser, server)
    page.goto(server.base + "/chat")
    page.fill("#chat-input", "Tell me a fact")
    page.press("#chat-input", "Enter")
    page.wait_for_selector(".msg.assistant .rate-link")
    answer = page.inner_text(".msg.assistant .text")
    page.click(".rate-link")
    page.wait_for_selector("#save-rating")
    for key in "44444":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#saved")
    page.click("nav >> text=Chat")
    page.wait_for_selector(".msg.assistant")
    assert page.inner_text(".msg.user .text") == "Tell me a fact"
    assert page.inner_text(".msg.assistant .text") == answer
    page.fill("#chat-input", "And another")  # the conversation goes on from where it was
    page.press("#chat-input", "Enter")
    page.locator(".msg.assistant").nth(1).wait_for()
    page.click("#chat-reset")
    page.reload()
    assert page.locator(".msg").count() == 0
