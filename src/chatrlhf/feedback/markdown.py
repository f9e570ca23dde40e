"""Model answers shown as a safe subset of Markdown: code blocks, inline code, bold, italics, headings and lists.

Safety comes from the order of work: each piece of text is HTML-escaped first, and only the tags written here
are added afterwards, none with attributes from the text. Raw HTML in an answer therefore shows as text, and a
link stays text (``[label](url)`` becomes ``label (url)``): nothing in an answer can run or navigate. The pages
keep the raw text beside it (a toggle), since rendering can hide what the model literally wrote.
"""

from __future__ import annotations

import re
from html import escape

from markupsafe import Markup

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\s*\d{1,9}[.)]\s+(.*)$")
_INLINE = [  # applied to escaped text, in this order; code spans are cut out before these run
    (re.compile(r"\*\*(\S(?:.*?\S)?)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<!\w)__(\S(?:.*?\S)?)__(?!\w)"), r"<strong>\1</strong>"),  # not in snake_case names
    (re.compile(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])"), r"<em>\1</em>"),
    (re.compile(r"\[([^\]\n]+)\]\(([^)\s]+)\)"), r"\1 (\2)"),
]


def _inline(text: str) -> str:
    parts = re.split(r"(`[^`\n]+`)", text)
    out = []
    for part in parts:
        if len(part) > 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{escape(part[1:-1])}</code>")
            continue
        html = escape(part)
        for pattern, replacement in _INLINE:
            html = pattern.sub(replacement, html)
        out.append(html)
    return "".join(out)


def render(text: str) -> Markup:
    """``text`` as HTML (see the module docstring); every character of it appears escaped or in a code block."""
    return Markup("".join(f"<pre><code>{escape(chunk)}</code></pre>" if code else _text(chunk)
                          for code, chunk in _blocks(text)))


def _blocks(text: str) -> list[tuple[bool, str]]:
    """(is code, text) runs between fence lines; an unclosed block (an answer cut at the length limit) is code."""
    blocks, lines, code = [], [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            blocks.append((code, "\n".join(lines)))
            lines, code = [], not code
        else:
            lines.append(line)
    blocks.append((code, "\n".join(lines)))
    return [(c, t) for c, t in blocks if c or t.strip()]


def _text(text: str) -> str:
    """Paragraphs (lines joined by <br>), headings and lists of a run of text outside code blocks."""
    out: list[str] = []
    paragraph: list[str] = []
    items: list[str] = []
    tag = "ul"

    def flush() -> None:
        if paragraph:
            out.append("<p>" + "<br>".join(_inline(line) for line in paragraph) + "</p>")
            paragraph.clear()
        if items:
            out.append(f"<{tag}>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + f"</{tag}>")
            items.clear()

    for line in text.split("\n"):
        item = _BULLET.match(line) or _NUMBERED.match(line)
        if not line.strip() or (heading := _HEADING.match(line)):
            flush()
            if line.strip():
                out.append(f'<p class="md-h">{_inline(heading.group(2))}</p>')
        elif item:
            kind = "ul" if _BULLET.match(line) else "ol"
            if paragraph or (items and kind != tag):
                flush()
            tag = kind
            items.append(item.group(1))
        elif items:  # a continuation of the last item
            items[-1] += " " + line.strip()
        else:
            paragraph.append(line)
    flush()
    return "".join(out)
