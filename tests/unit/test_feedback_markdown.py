"""Model answers as safe Markdown (chatrlhf.feedback.markdown): the subset rendered, and nothing from the answer
ever becomes a tag, an attribute or a link."""

import re

import pytest

from chatrlhf.feedback.markdown import render

HOSTILE = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "`<script>alert(1)</script>`",
    "```\n</code></pre><script>alert(1)</script>\n```",
    "**<b onmouseover=alert(1)>x</b>**",
    "[click](javascript:alert(1))",
    '[x](https://e.example/" onclick="alert(1))',
    "# <iframe src=javascript:alert(1)>",
    "- <svg onload=alert(1)>",
    "&lt;script&gt; already escaped",
    "*<a href='javascript:alert(1)'>em</a>*",
]
ALLOWED = {"p", "br", "strong", "em", "code", "pre", "ul", "ol", "li"}


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_answers_render_as_text(text):
    html = str(render(text))
    tags = re.findall(r"<\s*/?\s*([a-zA-Z0-9]+)([^>]*)>", html)
    for name, attrs in tags:
        assert name in ALLOWED or (name == "p" and attrs == ' class="md-h"'), (name, html)
        assert attrs in ("", ' class="md-h"'), html  # no attribute ever comes from the answer
    assert "<a" not in html and "<script" not in html and "<img" not in html


def test_the_subset():
    html = str(render("# Plan\nUse **pip** and *venv*: `pip install x`\n\n- one\n- two\n1. first\n"
                      "```python\nif a < b:\n    print('x')\n```\nsnake_case_name stays"))
    assert html == ('<p class="md-h">Plan</p><p>Use <strong>pip</strong> and <em>venv</em>: <code>pip install x</code></p>'
                    "<ul><li>one</li><li>two</li></ul><ol><li>first</li></ol>"
                    "<pre><code>if a &lt; b:\n    print(&#x27;x&#x27;)</code></pre><p>snake_case_name stays</p>")


def test_an_answer_cut_inside_a_code_block_still_shows_as_code():
    assert str(render("Here:\n```\nx = 1\ny = <")) == "<p>Here:</p><pre><code>x = 1\ny = &lt;</code></pre>"


def test_links_stay_text():
    assert str(render("see [the docs](https://example.com/a)")) == "<p>see the docs (https://example.com/a)</p>"
