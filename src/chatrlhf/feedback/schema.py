"""The feedback database's schema and the checks every write passes: tables, limits, errors, validators.

Tables (docs/feedback.md explains every column; ``SCHEMA`` below is the source of truth):

    prompts      a conversation to answer (JSON messages ending with a user turn); the queue is the
                 prompts with ``queued = 1`` in id order; chat turns are stored with ``queued = 0``
    answers      one model answer to one prompt; queued prompts get two, ``slot`` 'a' and 'b'
    annotators   the people rating, by name
    comparisons  prompt + answers a and b -> choice 'a' | 'b' | 'tie', optional comment
    ratings      one answer -> overall and the simulated rater's four dimensions, each 1-5, optional comment
    retractions  an annotator's undo: one comparison or rating that no longer counts (version 2)

Nothing is ever updated or deleted in comparisons, ratings or retractions: an undo is a row of its own.
The queries live in ``store.py`` (``FeedbackStore``) and ``judgements.py`` (undo).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

SCHEMA_VERSION = 2
"""1: the first release. 2: adds ``retractions`` (undo); a version-1 file gets the table when it is opened."""
DIMENSIONS = ("consistency", "engagingness", "safety", "relevance")
"""The simulated rater's dialogue-quality dimensions (docs/rater.md), each 1-5 beside the overall."""
CHOICES = ("a", "b", "tie")
KINDS = ("comparison", "rating")
"""What a retraction retracts (``retractions.kind``)."""
MAX_NAME = 64
MAX_COMMENT = 4000

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
    id         INTEGER PRIMARY KEY,
    messages   TEXT NOT NULL,              -- JSON [{{"role", "content"}}, ...], last role 'user'
    key        TEXT NOT NULL UNIQUE,       -- canonical JSON of messages: one row per distinct prompt
    source     TEXT NOT NULL,              -- file it was imported from, or 'chat'
    queued     INTEGER NOT NULL CHECK (queued IN (0, 1)),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    id         INTEGER PRIMARY KEY,
    prompt_id  INTEGER NOT NULL REFERENCES prompts(id),
    slot       TEXT CHECK (slot IN ('a', 'b')),   -- the queue's pair; NULL for a chat answer
    model      TEXT NOT NULL,              -- model dir or built-in name that wrote it
    text       TEXT NOT NULL,
    finished   INTEGER NOT NULL CHECK (finished IN (0, 1)),  -- 0: cut at max_new_tokens
    settings   TEXT NOT NULL,              -- JSON: sampling settings and seed
    created_at REAL NOT NULL,
    UNIQUE (prompt_id, slot)
);
CREATE TABLE IF NOT EXISTS annotators (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND {MAX_NAME}),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS comparisons (
    id           INTEGER PRIMARY KEY,
    request_id   TEXT NOT NULL UNIQUE,
    prompt_id    INTEGER NOT NULL REFERENCES prompts(id),
    answer_a     INTEGER NOT NULL REFERENCES answers(id),
    answer_b     INTEGER NOT NULL REFERENCES answers(id),
    choice       TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie')),
    comment      TEXT NOT NULL DEFAULT '' CHECK (length(comment) <= {MAX_COMMENT}),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    created_at   REAL NOT NULL,
    CHECK (answer_a != answer_b)
);
CREATE TABLE IF NOT EXISTS ratings (
    id           INTEGER PRIMARY KEY,
    request_id   TEXT NOT NULL UNIQUE,
    answer_id    INTEGER NOT NULL REFERENCES answers(id),
    {", ".join(f"{d} INTEGER NOT NULL CHECK ({d} IN (1, 2, 3, 4, 5))" for d in ("overall", *DIMENSIONS))},
    comment      TEXT NOT NULL DEFAULT '' CHECK (length(comment) <= {MAX_COMMENT}),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    created_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_prompt ON answers(prompt_id);
CREATE INDEX IF NOT EXISTS comparisons_annotator ON comparisons(annotator_id, prompt_id);
CREATE INDEX IF NOT EXISTS ratings_annotator ON ratings(annotator_id, answer_id);
""" + """
CREATE TABLE IF NOT EXISTS retractions (
    id           INTEGER PRIMARY KEY,
    request_id   TEXT NOT NULL UNIQUE,     -- client-made: a resubmitted undo form retracts nothing more
    kind         TEXT NOT NULL CHECK (kind IN ('comparison', 'rating')),
    judgement_id INTEGER NOT NULL,         -- comparisons.id or ratings.id, as kind says
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    created_at   REAL NOT NULL,
    UNIQUE (kind, judgement_id)            -- a judgement is retracted at most once
);
-- judgement_id cannot be a foreign key (it names a row of one of two tables): this trigger checks it.
CREATE TRIGGER IF NOT EXISTS retraction_of_own_judgement BEFORE INSERT ON retractions
WHEN NOT EXISTS (SELECT 1 FROM comparisons c WHERE NEW.kind = 'comparison' AND c.id = NEW.judgement_id
                 AND c.annotator_id = NEW.annotator_id)
 AND NOT EXISTS (SELECT 1 FROM ratings r WHERE NEW.kind = 'rating' AND r.id = NEW.judgement_id
                 AND r.annotator_id = NEW.annotator_id)
BEGIN SELECT RAISE(ABORT, 'retractions.judgement_id must be a comparison or rating (as kind says) by annotator_id'); END;
"""


class FeedbackError(ValueError):
    """A request the store refuses (unknown id, value out of range, ...); the message names the field."""


class NotFound(FeedbackError):
    """An id that is not in the database."""


@dataclass(frozen=True)
class Saved:
    """What a save returns: the row id and whether this call wrote it (False: the request_id was saved
    before, so a resubmitted form changed nothing)."""

    id: int
    created: bool


def canonical(messages: list[dict]) -> str:
    """The identity of a prompt: canonical JSON of its messages (the same rule as ``chatrlhf pairs``)."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def check_messages(messages, what: str = "messages") -> list[dict]:
    """A prompt as data files give one (text, or {role, content} messages ending with a user turn), checked
    by ``chatrlhf.data.formats``, so the app accepts what ``chatrlhf`` reads and nothing else."""
    from chatrlhf.data.formats import DataError, prompt_messages

    try:
        return prompt_messages(messages, what)
    except DataError as err:
        raise FeedbackError(str(err)) from None


def check_name(name) -> str:
    """An annotator name: 1-64 printable characters after trimming."""
    name = name.strip() if isinstance(name, str) else ""
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise FeedbackError(f"annotator must be a name of 1-{MAX_NAME} printable characters")
    return name


def shown(value) -> str:
    """``repr(value)`` cut to one short line: an error message echoes what was sent, not 2 MB of it."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:45]}...{text[-12:]}"


def check_score(value, field: str) -> int:
    """An integer score 1-5 (``"4"`` from a form is accepted, ``4.5`` or ``6`` are not)."""
    try:
        # A form sends text; over 10 characters it is no score (and int() of 5,000 digits is a ValueError).
        score = int(value) if not isinstance(value, str) or len(value) <= 10 else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's 1e999 is read as inf
        score = None
    if score is None or isinstance(value, bool) or str(value).strip() != str(score) or not 1 <= score <= 5:
        raise FeedbackError(f"{field} must be an integer from 1 to 5, got {shown(value)}")
    return score


def check_comment(comment) -> str:
    comment = "" if comment is None else comment
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise FeedbackError(f"comment must be text of at most {MAX_COMMENT} characters")
    return comment.strip()


def check_request_id(request_id) -> str:
    if not isinstance(request_id, str) or not 8 <= len(request_id) <= 64 or not request_id.isprintable():
        raise FeedbackError("request_id must be a client-made id of 8-64 printable characters")
    return request_id
