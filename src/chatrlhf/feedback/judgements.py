"""Undo: an annotator retracts their latest comparison or rating, and every query leaves retracted ones out.

The store stays append-only: an undo does not delete or update the judgement, it adds a ``retractions``
row naming it (schema.py). From then on the judgement counts nowhere: not in the progress counters, not
in what is left to do (the item comes back), not in the Queue's counts, not in the export. Undoing again
retracts the latest judgement still in force, so two undos retract the two latest.

``FeedbackStore.undo_last`` and ``FeedbackStore.last_judgement`` call the functions here inside their
own transaction or connection; ``in_force`` is the SQL condition the store's reads add.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from chatrlhf.feedback.schema import KINDS, FeedbackError, check_name, check_request_id, shown

# kind -> the judgement's id, prompt and answer, with the annotator's name (n.name) to filter on
_LATEST = {
    "comparison": "SELECT c.id, c.prompt_id, NULL AS answer_id FROM comparisons c"
                  " JOIN annotators n ON n.id = c.annotator_id",
    "rating": "SELECT r.id, a.prompt_id, r.answer_id FROM ratings r JOIN answers a ON a.id = r.answer_id"
              " JOIN annotators n ON n.id = r.annotator_id",
}
_ALIAS = {"comparison": "c", "rating": "r"}


@dataclass(frozen=True)
class Undone:
    """A retracted judgement: ``kind`` ('comparison' | 'rating'), its row ``id``, the ``prompt_id`` it
    judged and, for a rating, the ``answer_id`` (None for a comparison); ``created``: False when this
    request_id had already undone it (a resubmitted form retracted nothing more)."""

    kind: str
    id: int
    prompt_id: int
    answer_id: int | None
    created: bool


def in_force(kind: str, alias: str) -> str:
    """SQL: the judgement row ``alias`` (of ``kind``) has not been retracted."""
    return (f"NOT EXISTS (SELECT 1 FROM retractions x WHERE x.kind = '{kind}' "
            f"AND x.judgement_id = {alias}.id)")


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise FeedbackError(f"kind must be one of {', '.join(KINDS)}, got {shown(kind)}")
    return kind


def latest(con: sqlite3.Connection, annotator: str, kind: str) -> sqlite3.Row | None:
    """``annotator``'s most recent judgement of ``kind`` still in force (highest id: the order of the
    commits), as (id, prompt_id, answer_id); None when there is none."""
    alias = _ALIAS[check_kind(kind)]
    return con.execute(f"{_LATEST[kind]} WHERE n.name = ? AND {in_force(kind, alias)} ORDER BY {alias}.id DESC"
                       " LIMIT 1", (check_name(annotator),)).fetchone()


def retract_latest(con: sqlite3.Connection, request_id: str, annotator: str, kind: str) -> Undone:
    """Inside the caller's write transaction: retracts ``annotator``'s latest ``kind`` in force, or, when
    ``request_id`` already undid one, returns that one again (``created`` False) and retracts nothing."""
    request_id, kind, name = check_request_id(request_id), check_kind(kind), check_name(annotator)
    done = con.execute("SELECT kind, judgement_id FROM retractions WHERE request_id = ?", (request_id,)).fetchone()
    if done is not None:
        if done["kind"] != kind:
            raise FeedbackError(f"request_id {request_id!r} already undid a {done['kind']}, not a {kind}; "
                                "send a new request_id for another undo")
        row = con.execute(f"{_LATEST[kind]} WHERE {_ALIAS[kind]}.id = ?", (done["judgement_id"],)).fetchone()
        return Undone(kind, row["id"], row["prompt_id"], row["answer_id"], False)
    row = latest(con, name, kind)
    if row is None:
        raise FeedbackError(f"kind: {name} has no {kind} to undo (none saved, or all undone already); "
                            f"save a {kind} first")
    who = con.execute("SELECT id FROM annotators WHERE name = ?", (name,)).fetchone()[0]
    con.execute("INSERT INTO retractions (request_id, kind, judgement_id, annotator_id, created_at)"
                " VALUES (?, ?, ?, ?, ?)", (request_id, kind, row["id"], who, time.time()))
    return Undone(kind, row["id"], row["prompt_id"], row["answer_id"], True)
