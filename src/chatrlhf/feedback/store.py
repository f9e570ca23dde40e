"""The feedback database: prompts, generated answers, comparisons and ratings in one SQLite file.

``FeedbackStore`` holds every query; the tables, limits and value checks are in ``schema.py``.

Durability: WAL journal with ``synchronous=FULL``, every write one ``BEGIN IMMEDIATE`` transaction, and
a rating or comparison is acknowledged only after its COMMIT returned, so a killed server (or machine)
loses nothing it acknowledged. Several annotators (threads or processes) write at once: writers queue on
SQLite's lock (``busy_timeout``) while readers keep reading the last committed state. A client-made
``request_id`` (unique) makes a resubmitted form a no-op instead of a second vote.

Append-only: judgements are never updated or deleted. An undo adds a ``retractions`` row (``undo_last``,
judgements.py), and every read below counts only the judgements still in force (``_COMPARED``, ``_RATED``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chatrlhf.feedback.judgements import Undone, in_force, latest, retract_latest
from chatrlhf.feedback.schema import (
    CHOICES,
    DIMENSIONS,
    SCHEMA,
    SCHEMA_VERSION,
    FeedbackError,
    NotFound,
    Saved,
    canonical,
    check_comment,
    check_messages,
    check_name,
    check_request_id,
    check_score,
)


class FeedbackStore:
    """All reads and writes of one feedback database. Safe to share across threads and processes: every
    call opens its own connection (cheap for SQLite) and writes in one transaction."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        if self.path.is_dir():
            raise FeedbackError(f"--db {self.path} is a directory; name a file such as {self.path / 'feedback.db'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            self._migrate(con)

    # ------------------------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        except sqlite3.DatabaseError as err:
            raise FeedbackError(f"--db {self.path} is not a chatrlhf feedback database ({err}); "
                                "name a new file or a database this app wrote") from None
        con.row_factory = sqlite3.Row
        return con

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction: BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlock between two
        writers); COMMIT has returned, so the data is on disk, before the caller acknowledges anything."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def _migrate(self, con: sqlite3.Connection) -> None:
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as err:
            raise FeedbackError(f"--db {self.path} is not a chatrlhf feedback database ({err}); "
                                "name a new file or a database this app wrote") from None
        if tables and "meta" not in tables:
            raise FeedbackError(f"--db {self.path} is an SQLite database of something else (tables: "
                                f"{', '.join(sorted(tables))}); name a new file for the feedback")
        if tables:  # a file of a newer chatrlhf is refused before anything is written to it
            self._check_version(con)
        # One transaction, so two servers starting on a new file at once create the tables once. Every
        # statement of SCHEMA is IF NOT EXISTS, so on an older file it adds exactly what is new (version 1 ->
        # 2: the retractions table and its trigger), and the version is raised (never lowered) with it.
        con.executescript(f"BEGIN IMMEDIATE; {SCHEMA} INSERT OR IGNORE INTO meta VALUES "
                          f"('schema_version', '{SCHEMA_VERSION}'); UPDATE meta SET value = '{SCHEMA_VERSION}' "
                          f"WHERE key = 'schema_version' AND CAST(value AS INTEGER) < {SCHEMA_VERSION}; COMMIT;")
        self._check_version(con)

    def _check_version(self, con: sqlite3.Connection) -> None:
        row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise FeedbackError(f"--db {self.path} has schema version {row[0]}, newer than this chatrlhf "
                                f"({SCHEMA_VERSION}); upgrade chatrlhf to open it")

    # ------------------------------------------------------------------------------------ prompts
    def add_prompts(self, prompts: list[list[dict]], source: str, queued: bool = True) -> tuple[int, int]:
        """Adds prompts (message lists) in order; returns (added, already present). A prompt already in the
        database (same messages) is not added again; importing a chat turn's prompt later queues it."""
        prompts = [check_messages(m, f"prompt {i + 1}") for i, m in enumerate(prompts)]
        added = 0
        with self._write() as con:
            for messages in prompts:
                key = canonical(messages)
                if con.execute("SELECT 1 FROM prompts WHERE key = ?", (key,)).fetchone() is not None:
                    if queued:
                        con.execute("UPDATE prompts SET queued = 1 WHERE key = ?", (key,))
                    continue
                con.execute("INSERT INTO prompts (messages, key, source, queued, created_at) VALUES (?, ?, ?, ?, ?)",
                            (json.dumps(messages, ensure_ascii=False), key, source, int(queued), time.time()))
                added += 1
        return added, len(prompts) - added

    def prompt(self, prompt_id: int) -> dict:
        with self._read() as con:
            row = con.execute("SELECT * FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        if row is None:
            raise NotFound(f"prompt_id {prompt_id} does not exist")
        return _prompt_dict(row)

    def prompt_id_for(self, messages: list[dict]) -> int | None:
        with self._read() as con:
            row = con.execute("SELECT id FROM prompts WHERE key = ?", (canonical(messages),)).fetchone()
        return None if row is None else row[0]

    def queue(self, limit: int = 1000, offset: int = 0, search: str = "") -> list[dict]:
        """Queued prompts in order (those whose text contains ``search``, ignoring ASCII case), each with how
        many answers it has, how many people compared it and how many (person, answer) ratings it has (each
        person's judgement of an item once, as the progress counters count; undone ones not at all)."""
        with self._read() as con:
            rows = con.execute(
                "SELECT p.*, (SELECT count(*) FROM answers a WHERE a.prompt_id = p.id AND a.slot IS NOT NULL) AS n_answers,"
                " (SELECT count(DISTINCT c.annotator_id) FROM comparisons c WHERE c.prompt_id = p.id"
                f" AND {_COMPARED}) AS n_comparisons, (SELECT count(DISTINCT r.annotator_id || ':' || r.answer_id)"
                f" FROM ratings r JOIN answers a ON a.id = r.answer_id WHERE a.prompt_id = p.id AND {_RATED})"
                f" AS n_ratings FROM prompts p WHERE p.queued = 1{_MATCHES} ORDER BY p.id LIMIT ? OFFSET ?",
                (_pattern(search), limit, offset)).fetchall()
        return [{**_prompt_dict(r), "n_answers": r["n_answers"], "n_comparisons": r["n_comparisons"],
                 "n_ratings": r["n_ratings"]} for r in rows]

    def queue_size(self, search: str = "") -> int:
        """How many prompts ``queue(search=search)`` pages through."""
        with self._read() as con:
            return con.execute(f"SELECT count(*) FROM prompts p WHERE p.queued = 1{_MATCHES}",
                               (_pattern(search),)).fetchone()[0]

    def prompts_missing_answers(self, limit: int = 1) -> list[int]:
        """Queued prompts, in queue order, that do not have both answers of their pair yet."""
        with self._read() as con:
            rows = con.execute(
                "SELECT id FROM prompts p WHERE queued = 1 AND "
                "(SELECT count(*) FROM answers a WHERE a.prompt_id = p.id AND a.slot IS NOT NULL) < 2 "
                "ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------------------------------ answers
    def add_answer(self, prompt_id: int, model: str, text: str, finished: bool, settings: dict,
                   slot: str | None = None) -> int:
        """Stores an answer; for a pair slot already filled (another worker was first) returns that one."""
        if slot not in (None, "a", "b"):
            raise FeedbackError(f"slot must be 'a', 'b' or None, got {slot!r}")
        with self._write() as con:
            if con.execute("SELECT 1 FROM prompts WHERE id = ?", (prompt_id,)).fetchone() is None:
                raise NotFound(f"prompt_id {prompt_id} does not exist")
            if slot is not None:
                row = con.execute("SELECT id FROM answers WHERE prompt_id = ? AND slot = ?", (prompt_id, slot)).fetchone()
                if row is not None:
                    return row[0]
            cur = con.execute(
                "INSERT INTO answers (prompt_id, slot, model, text, finished, settings, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (prompt_id, slot, model, text, int(finished), json.dumps(settings, sort_keys=True), time.time()))
            return cur.lastrowid

    def answer(self, answer_id: int) -> dict:
        with self._read() as con:
            row = con.execute("SELECT * FROM answers WHERE id = ?", (answer_id,)).fetchone()
        if row is None:
            raise NotFound(f"answer_id {answer_id} does not exist")
        return dict(row)

    def pair(self, prompt_id: int) -> tuple[dict, dict] | None:
        """The (a, b) answers of a queued prompt, or None while they are not both generated."""
        with self._read() as con:
            rows = con.execute("SELECT * FROM answers WHERE prompt_id = ? AND slot IS NOT NULL ORDER BY slot",
                               (prompt_id,)).fetchall()
        return (dict(rows[0]), dict(rows[1])) if len(rows) == 2 else None

    # ------------------------------------------------------------------------------------ annotators
    def annotator_id(self, name: str, con: sqlite3.Connection | None = None) -> int:
        """The id of ``name``, added on first use."""
        name = check_name(name)
        if con is None:
            with self._write() as con:
                return self.annotator_id(name, con)
        con.execute("INSERT OR IGNORE INTO annotators (name, created_at) VALUES (?, ?)", (name, time.time()))
        return con.execute("SELECT id FROM annotators WHERE name = ?", (name,)).fetchone()[0]

    # ------------------------------------------------------------------------------------ judgements
    def add_comparison(self, request_id: str, prompt_id: int, answer_a: int, answer_b: int, choice: str,
                       annotator: str, comment: str = "") -> Saved:
        """Saves "answer_a vs answer_b for prompt_id: choice" by ``annotator``; durable when it returns."""
        request_id, comment = check_request_id(request_id), check_comment(comment)
        if choice not in CHOICES:
            raise FeedbackError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if answer_a == answer_b:
            raise FeedbackError("answer_a and answer_b must be two different answers")
        with self._write() as con:
            if (row := _existing(con, "comparisons", request_id)) is not None:
                return Saved(row, False)
            if con.execute("SELECT 1 FROM prompts WHERE id = ?", (prompt_id,)).fetchone() is None:
                raise NotFound(f"prompt_id {prompt_id} does not exist")
            for field, answer_id in (("answer_a", answer_a), ("answer_b", answer_b)):
                row = con.execute("SELECT prompt_id FROM answers WHERE id = ?", (answer_id,)).fetchone()
                if row is None:
                    raise NotFound(f"{field} {answer_id} does not exist")
                if row[0] != prompt_id:
                    raise FeedbackError(f"{field} {answer_id} answers prompt {row[0]}, not prompt_id {prompt_id}")
            who = self.annotator_id(annotator, con)
            cur = con.execute(
                "INSERT INTO comparisons (request_id, prompt_id, answer_a, answer_b, choice, comment, annotator_id,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, prompt_id, answer_a, answer_b, choice, comment, who, time.time()))
            return Saved(cur.lastrowid, True)

    def add_rating(self, request_id: str, answer_id: int, scores: dict, annotator: str, comment: str = "") -> Saved:
        """Saves a 1-5 rating (``scores``: overall and every one of ``DIMENSIONS``); durable when it returns."""
        request_id, comment = check_request_id(request_id), check_comment(comment)
        values = [check_score(scores.get(k), k) for k in ("overall", *DIMENSIONS)]
        with self._write() as con:
            if (row := _existing(con, "ratings", request_id)) is not None:
                return Saved(row, False)
            if con.execute("SELECT 1 FROM answers WHERE id = ?", (answer_id,)).fetchone() is None:
                raise NotFound(f"answer_id {answer_id} does not exist")
            who = self.annotator_id(annotator, con)
            cur = con.execute(
                f"INSERT INTO ratings (request_id, answer_id, overall, {', '.join(DIMENSIONS)}, comment, annotator_id,"
                f" created_at) VALUES (?, ?, ?, {', '.join('?' * len(DIMENSIONS))}, ?, ?, ?)",
                (request_id, answer_id, *values, comment, who, time.time()))
            return Saved(cur.lastrowid, True)

    def undo_last(self, request_id: str, annotator: str, kind: str) -> Undone:
        """Retracts ``annotator``'s latest ``kind`` ('comparison' | 'rating') still in force and returns it;
        durable when it returns. The judgement's row stays; it just counts nowhere any more. A ``request_id``
        that already undid one returns that one again (``created`` False). Nothing to undo: FeedbackError."""
        with self._write() as con:
            return retract_latest(con, request_id, annotator, kind)

    def last_judgement(self, annotator: str, kind: str) -> dict | None:
        """What ``undo_last`` would retract now: ``{"id", "prompt_id", "answer_id"}``, or None."""
        with self._read() as con:
            row = latest(con, annotator, kind)
        return None if row is None else dict(row)

    # ------------------------------------------------------------------------------------ the next task
    def next_to_compare(self, annotator: str, after: int = 0) -> int | None:
        """The first queued prompt (after prompt ``after``, else from the start: a skipped prompt comes back
        last) whose pair is ready and that ``annotator`` has not compared (an undone comparison is not one)."""
        with self._read() as con:
            row = con.execute(
                f"SELECT p.id FROM prompts p WHERE {_READY} AND NOT EXISTS ({_MY_COMPARISON})"
                " ORDER BY p.id <= ?, p.id LIMIT 1",
                (check_name(annotator), after)).fetchone()
        return None if row is None else row[0]

    def next_to_rate(self, annotator: str) -> int | None:
        """The first answer of the queue's pairs (queue order, then slot) ``annotator`` has not rated (an undone
        rating is not one)."""
        with self._read() as con:
            row = con.execute(
                "SELECT a.id FROM answers a JOIN prompts p ON p.id = a.prompt_id WHERE p.queued = 1"
                f" AND a.slot IS NOT NULL AND NOT EXISTS ({_MY_RATING}) ORDER BY p.id, a.slot LIMIT 1",
                (check_name(annotator),)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------------------------ progress
    def progress(self, annotator: str | None = None) -> dict:
        """Counters for the pages: queue size, pairs ready, comparisons and ratings in all and per person (each
        person's judgement of an item once; ``*_saved``: every row of the history still in force; ``*_undone``:
        the rows undone). An undone judgement counts in none but ``*_undone``."""
        with self._read() as con:
            one = lambda sql, *args: con.execute(sql, args).fetchone()[0]  # noqa: E731
            out = {
                "prompts": one("SELECT count(*) FROM prompts WHERE queued = 1"),
                "pairs_ready": one("SELECT count(*) FROM (SELECT a.prompt_id FROM answers a JOIN prompts p ON"
                                   " p.id = a.prompt_id WHERE p.queued = 1 AND a.slot IS NOT NULL"
                                   " GROUP BY a.prompt_id HAVING count(*) = 2)"),
                # A person's judgement of an item counts once however often it was redone (the export keeps
                # the latest): distinct (annotator, prompt) comparisons and (annotator, answer) ratings.
                "comparisons": one("SELECT count(*) FROM (SELECT DISTINCT annotator_id, prompt_id FROM comparisons c"
                                   f" WHERE {_COMPARED})"),
                "ratings": one(f"SELECT count(*) FROM (SELECT DISTINCT annotator_id, answer_id FROM ratings r WHERE {_RATED})"),
                # every judgement saved and not undone, re-judgements included (the append-only history)
                "comparisons_saved": one(f"SELECT count(*) FROM comparisons c WHERE {_COMPARED}"),
                "ratings_saved": one(f"SELECT count(*) FROM ratings r WHERE {_RATED}"),
                "comparisons_undone": one("SELECT count(*) FROM retractions WHERE kind = 'comparison'"),
                "ratings_undone": one("SELECT count(*) FROM retractions WHERE kind = 'rating'"),
                "chat_answers": one("SELECT count(*) FROM answers WHERE slot IS NULL"),
                "annotators": [dict(r) for r in con.execute(
                    "SELECT n.name, (SELECT count(DISTINCT c.prompt_id) FROM comparisons c WHERE c.annotator_id = n.id"
                    f" AND {_COMPARED}) AS comparisons, (SELECT count(DISTINCT r.answer_id) FROM ratings r"
                    f" WHERE r.annotator_id = n.id AND {_RATED}) AS ratings"
                    " FROM annotators n ORDER BY n.name")],
            }
            if annotator:  # what is left for this person among the pairs ready now
                name = check_name(annotator)
                left = (one(f"SELECT count(*) FROM prompts p WHERE {_READY} AND NOT EXISTS ({_MY_COMPARISON})", name),
                        one(f"SELECT count(*) FROM answers a JOIN prompts p ON p.id = a.prompt_id WHERE {_READY}"
                            f" AND a.slot IS NOT NULL AND NOT EXISTS ({_MY_RATING})", name))
        out["answers_to_rate"] = 2 * out["pairs_ready"]
        if annotator:
            mine = next((a for a in out["annotators"] if a["name"] == annotator), None) or {}
            out["you"] = {"name": annotator, "comparisons": mine.get("comparisons", 0), "ratings": mine.get("ratings", 0),
                          "to_compare": left[0], "to_rate": left[1]}
        return out

    # ------------------------------------------------------------------------------------ export rows
    def comparison_rows(self) -> list[dict]:
        """Every comparison not undone, with its prompt, answer texts, models and annotator, in the order saved
        (an undone one is left out: the export and comparisons.jsonl see only the judgements in force)."""
        with self._read() as con:
            rows = con.execute(
                "SELECT c.id, c.choice, c.comment, c.created_at, n.name AS annotator, p.messages,"
                " a.text AS answer_a, a.model AS model_a, b.text AS answer_b, b.model AS model_b"
                " FROM comparisons c JOIN prompts p ON p.id = c.prompt_id JOIN answers a ON a.id = c.answer_a"
                f" JOIN answers b ON b.id = c.answer_b JOIN annotators n ON n.id = c.annotator_id WHERE {_COMPARED}"
                " ORDER BY c.id"
            ).fetchall()
        return [{**{k: r[k] for k in r.keys() if k != "messages"}, "prompt": json.loads(r["messages"])} for r in rows]

    def rating_rows(self) -> list[dict]:
        """Every rating not undone, with its prompt, answer text, model and annotator, in the order saved."""
        with self._read() as con:
            rows = con.execute(
                f"SELECT r.id, r.overall, {', '.join('r.' + d for d in DIMENSIONS)}, r.comment, r.created_at,"
                " n.name AS annotator, p.messages, a.text AS response, a.model, a.finished"
                " FROM ratings r JOIN answers a ON a.id = r.answer_id JOIN prompts p ON p.id = a.prompt_id"
                f" JOIN annotators n ON n.id = r.annotator_id WHERE {_RATED} ORDER BY r.id").fetchall()
        return [{**{k: r[k] for k in r.keys() if k != "messages"}, "prompt": json.loads(r["messages"])} for r in rows]

    def integrity_check(self) -> str:
        with self._read() as con:
            return con.execute("PRAGMA integrity_check").fetchone()[0]


def _existing(con: sqlite3.Connection, table: str, request_id: str) -> int | None:
    row = con.execute(f"SELECT id FROM {table} WHERE request_id = ?", (request_id,)).fetchone()
    return None if row is None else row[0]


_COMPARED, _RATED = in_force("comparison", "c"), in_force("rating", "r")  # a judgement not undone
# Has the annotator named by the query's parameter judged prompt p / answer a (a judgement in force)?
_MY_COMPARISON = ("SELECT 1 FROM comparisons c JOIN annotators n ON n.id = c.annotator_id WHERE c.prompt_id = p.id"
                  f" AND n.name = ? AND {_COMPARED}")
_MY_RATING = ("SELECT 1 FROM ratings r JOIN annotators n ON n.id = r.annotator_id WHERE r.answer_id = a.id"
              f" AND n.name = ? AND {_RATED}")
_READY = ("p.queued = 1 AND (SELECT count(*) FROM answers b WHERE b.prompt_id = p.id AND b.slot IS NOT NULL) = 2")
_MATCHES = " AND p.messages LIKE ? ESCAPE '\\'"  # the prompt's JSON text holds the search text


def _pattern(search: str) -> str:
    """A LIKE pattern matching ``search`` literally, as it is written inside the stored JSON (quotes and
    backslashes escaped by JSON, then % and _ and the escape character by LIKE)."""
    search = json.dumps(search, ensure_ascii=False)[1:-1]
    return "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _prompt_dict(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "messages": json.loads(row["messages"]), "source": row["source"],
            "queued": bool(row["queued"]), "created_at": row["created_at"]}
