"""The feedback app used as an annotator uses it, in headless Chromium against a real ``chatrlhf serve``. The bugs
(each test failed before its fix, but the error-page one): a held shortcut key votes once, a link opened before
giving a name lands where it pointed, bad queries get the app's own error page, a re-judged item counts once, the
queue pages past 1,000 prompts and searches, a chat turn's prompt can be compared, and without pre-generation a
page waits for its pair instead of blocking. Then the workflow: comment-then-choose, Skip and the guidelines,
keyboard rating, pasted prompts, the Export page, Markdown with its raw text, the chat kept while rating, and
every page at desktop and phone sizes."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
from feedback_server import CHROMIUM, Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/test.sh installs it)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the tests that only look at their own annotator's work (each page a new name)."""
    root = tmp_path_factory.mktemp("shared")
    srv = Server(root / "feedback.db", log=root / "serve.log")
    yield srv
    srv.stop()


@pytest.fixture()
def own_server(tmp_path):
    """A server of the test's own, for tests that count everything in the database."""
    srv = Server(tmp_path / "feedback.db", log=tmp_path / "serve.log")
    yield srv
    srv.stop()


NAMES = itertools.count(1)


def named_page(browser, srv, name: str | None = None):
    """A new browser context whose annotator name is set (a new name each time unless given)."""
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(srv.base + "/")
    page.annotator = name or f"annotator {next(NAMES)}"
    page.fill("#annotator", page.annotator)
    page.click("text=Save")
    return page


def mine(page, srv, name: str) -> list[dict]:
    """This page's annotator's rows of an export file (``comparisons`` or ``ratings``), in the order saved."""
    rows = [json.loads(r) for r in page.request.get(f"{srv.base}/export/{name}.jsonl").text().splitlines() if r]
    return [r for r in rows if r["annotator"] == page.annotator]


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
    assert len(mine(page, server, "comparisons")) == 1  # one vote saved in all


def test_a_link_opened_before_giving_a_name_lands_where_it_pointed(browser, server):
    setup = named_page(browser, server)
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
    assert progress(page, server)["you"]["comparisons"] == 1 and len(mine(page, server, "comparisons")) == 2


def test_the_queue_pages_past_a_thousand_prompts_and_searches(browser, own_server):
    server = own_server
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
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(srv.base + "/compare")
        assert page.is_visible("#waiting")  # answered at once: the pair is generated in the background
        fits_at_both_sizes(page, ["#waiting", "section.prompt"])
        page.wait_for_selector("#choose-a")
        page.click("#choose-a")
        page.wait_for_selector("#done")  # the only prompt is compared: the done page, with its undo
        fits_at_both_sizes(page, ["#done", "#saved", "#undo"])
    finally:
        srv.stop()


def fits_at_both_sizes(page, parts: list[str]) -> None:
    """The page as it is shows each part, nothing past the screen's edge, at both SIZES."""
    for width, height in SIZES:
        page.set_viewport_size({"width": width, "height": height})
        for part in parts:
            assert page.locator(part).first.is_visible(), (page.url, width, part)
        assert page.evaluate(CUT_OFF) == [], (page.url, width)


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


SIZES = [(1366, 768), (390, 844)]  # a laptop and a phone
CUT_OFF = """() => {
  // Visible elements of the page that reach past the right edge, outside anything scrolling sideways.
  const width = document.documentElement.clientWidth;
  const scrolls = (el) => { for (; el; el = el.parentElement) { const o = getComputedStyle(el).overflowX;
                              if (o === "auto" || o === "scroll") return true; } return false; };
  return Array.from(document.querySelectorAll("body *")).filter((el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && r.right > width + 0.5 && !scrolls(el.parentElement);
  }).map((el) => el.tagName + (el.id ? "#" + el.id : "") + "." + el.className).slice(0, 5);
}"""
CODE = "Like this:\n```python\nprint(" + ", ".join(f"value_{i}" for i in range(40)) + ")\n```\nDone."  # a wide line
PAGES = {  # what each page must show at both sizes, fully (inside the screen's width)
    "home": ("/", ["#annotator", "header nav", "#progress"]),
    "compare": ("/compare?prompt_id={pid}", ["#answer-a", "#answer-b", "#choose-a", "#choose-tie", "#choose-b", "#skip",
                                         "#guidelines", "textarea[name=comment]", "#raw-toggle", "#undo"]),
    "rate": ("/rate?answer_id={aid}", ["#item-name", "table.scores", "#save-rating", "textarea[name=comment]", "#answer"]),
    "chat": ("/chat", ["#chat-model", "#chat-input", "#chat-send", "#chat-reset", ".msg.assistant .rate-link",
                       "form.inline-rating .save-inline"]),
    "queue": ("/queue", ["#prompt-file", "#prompt-text", "#add-pasted", "#queue-search", "table.queue"]),
    "export": ("/export", ["#dl-pairs", "#dl-kto", "#stats-comparisons", "#agreement"]),
    "error": ("/compare?prompt_id=abc", ["#error", "header nav"]),
}


def test_every_page_shows_everything_at_desktop_and_phone_sizes(browser, server, tmp_path):
    """Each page's parts are visible and nothing reaches past the screen's edge (a table may scroll inside
    itself), at 1366x768 and 390x844; A/B side by side on the laptop, stacked on the phone. Screenshots of every
    page at both sizes are left in the test's directory."""
    from chatrlhf.feedback.store import FeedbackStore

    page, bob = named_page(browser, server), named_page(browser, server)
    # A pair with a code block of one wide line, written before the prompt is queued (so the server's
    # model does not answer it first).
    store, prompt = FeedbackStore(server.db), [{"role": "user", "content": "A long prompt " + "with many words " * 40}]
    store.add_prompts([prompt], source="test", queued=False)
    pid = store.prompt_id_for(prompt)
    aid = store.add_answer(pid, "m", CODE, True, {}, slot="a")
    store.add_answer(pid, "m", CODE.replace("Done", "Finished"), True, {}, slot="b")
    store.add_prompts([prompt], source="test")
    for who in (page, bob):  # two annotators' votes on it: the Export page's agreement table
        who.goto(f"{server.base}/compare?prompt_id={pid}")
        who.click("#choose-a")
        who.wait_for_selector("#saved")
    for width, height in SIZES:
        page.set_viewport_size({"width": width, "height": height})
        for name, (path, parts) in PAGES.items():
            page.goto(server.base + path.format(pid=pid, aid=aid))
            if name == "chat" and not page.locator(".msg.assistant").count():
                page.fill("#chat-input", "Hi")
                page.press("#chat-input", "Enter")
                page.click(".msg.assistant .rate-link", timeout=60_000)
            elif name == "chat":
                page.click(".msg.assistant .rate-link")
            for part in parts:
                assert page.locator(part).first.is_visible(), (name, width, part)
            assert page.evaluate(CUT_OFF) == [], (name, width)
            overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, (name, width, overflow)
            page.screenshot(path=str(tmp_path / f"{name}-{width}x{height}.png"), full_page=True)
            if name == "compare":
                a, b = page.locator("#answer-a").bounding_box(), page.locator("#answer-b").bounding_box()
                assert (b["y"] >= a["y"] + a["height"]) == (width < 700), (width, a, b)
                assert page.locator("#choose-a").bounding_box()["height"] >= (44 if width < 700 else 20)


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
    [row] = mine(page, server, "ratings")
    assert {k: row[k] for k in ("score", "consistency", "engagingness", "safety", "relevance")} == {
        "score": 4, "consistency": 3, "engagingness": 5, "safety": 2, "relevance": 4}


def test_prompts_can_be_pasted_on_the_queue_page(browser, server):
    page = named_page(browser, server)
    page.goto(server.base + "/queue")
    page.fill("#prompt-text", "How do tides work?\n\n  Name a prime number.  \nHow do tides work?\n")
    page.click("#add-pasted")
    assert "Imported 2 new prompts (1 already present)" in page.inner_text("#imported")
    page.fill("#queue-search", "prime number")
    page.press("#queue-search", "Enter")
    page.wait_for_selector("text=of 1 prompts containing")
    assert "Name a prime number." in page.inner_text("table.queue")  # trimmed, blank lines left out


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
    answer_id = FeedbackStore(server.db).add_answer(1, "m", text, True, {})
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


def test_chat_streams_stops_rates_inline_and_survives_a_reload(browser, tmp_path):
    """An answer arrives piece by piece, Stop cuts it (stored as written, marked stopped), it is rated beside the
    conversation, shown as Markdown with its raw text, and the conversation survives leaving the page."""
    srv = Server(tmp_path / "feedback.db", "--generation.max_new_tokens", "480", log=tmp_path / "serve.log")
    try:
        page = named_page(browser, srv)
        page.goto(srv.base + "/chat")
        seen = []
        page.on("request", lambda r: seen.append(r.url.removeprefix(srv.base)) if r.method == "POST" else None)
        # Seed 1: the tiny model writes all 480 tokens (about 0.6 s here) instead of ending early, so the stop
        # lands mid-answer. The page sends no seed; this adds one to its request.
        page.route("**/api/chat/stream", lambda route: route.continue_(
            post_data=json.dumps({**json.loads(route.request.post_data), "seed": 1})))
        page.fill("#chat-input", "Tell me a long story")
        page.press("#chat-input", "Enter")
        page.wait_for_selector("#chat-stop", state="visible")
        body = page.locator(".msg.assistant .text")
        for _ in range(300):  # until some text has streamed in
            if body.inner_text():
                break
            time.sleep(0.01)
        page.click("#chat-stop")
        page.wait_for_selector(".msg.assistant .rate-link")
        assert "/api/chat/stream" in seen and "/api/chat/stop" in seen
        assert page.is_hidden("#chat-stop") and page.is_enabled("#chat-send")
        assert page.inner_text(".msg.assistant .cut") == "(stopped)"
        # Rate it inline: every row's 4, a comment, saved without leaving the page.
        page.click(".msg.assistant .rate-link")
        form = page.locator("form.inline-rating")
        for row in range(5):
            form.locator("tr[data-dim]").nth(row).locator("label.pick").nth(3).click()
        form.locator("textarea[name=comment]").fill("stopped early")
        form.locator(".save-inline").click()
        page.wait_for_selector(".inline-status.saved")
        assert page.url == srv.base + "/chat"
        [rating] = [json.loads(r) for r in page.request.get(srv.base + "/export/ratings.jsonl").text().splitlines() if r]
        assert (rating["score"], rating["relevance"], rating["comment"]) == (4, 4, "stopped early")
        # Markdown with the raw text a click away; the raw text is what was stored.
        assert page.is_visible(".msg.assistant .text.md") and page.is_hidden(".msg.assistant .text.raw")
        page.click("#raw-toggle")
        assert page.inner_text(".msg.assistant .text.raw") == rating["response"]
        page.click("#raw-toggle")
        page.reload()  # the conversation is kept (this tab's sessionStorage), rating button included
        page.wait_for_selector(".msg.assistant .rate-link")
        assert page.inner_text(".msg.user .text") == "Tell me a long story"
        page.click("#chat-reset")
        page.reload()
        assert page.locator(".msg").count() == 0
    finally:
        srv.stop()


def test_undo_with_the_u_key_and_ctrl_enter_saves_a_rating(browser, server):
    """u undoes the last comparison (back on its prompt, out of the export and the counters); Ctrl+Enter in the
    comment box saves a rating, and u undoes that too."""
    page = named_page(browser, server)
    page.goto(server.base + "/compare")
    page.wait_for_selector("#choose-a")
    assert page.locator("#undo").count() == 0  # nothing to undo yet
    first = page.input_value("input[name=prompt_id]")
    page.keyboard.press("1")
    wait_for_prompt(page, changed_from=first)
    assert len(mine(page, server, "comparisons")) == 1
    page.keyboard.press("u")
    page.wait_for_selector("#undone")
    assert page.input_value("input[name=prompt_id]") == first  # back on the prompt it judged
    assert mine(page, server, "comparisons") == [] and progress(page, server)["you"]["comparisons"] == 0

    page.goto(server.base + "/rate")
    page.wait_for_selector("#save-rating")
    for key in "34534":
        page.keyboard.press(key)
    page.fill("textarea[name=comment]", "saved from the comment box")
    page.press("textarea[name=comment]", "Control+Enter")
    page.wait_for_selector("#saved")
    [rating] = mine(page, server, "ratings")
    assert (rating["score"], rating["comment"]) == (3, "saved from the comment box")
    page.keyboard.press("u")
    page.wait_for_selector("#undone")
    assert mine(page, server, "ratings") == [] and progress(page, server)["you"]["ratings"] == 0
