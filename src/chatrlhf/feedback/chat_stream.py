"""Chat answers for the chat page: streamed as server-sent events while they are generated, with a stop.

``POST /api/chat/stream`` answers ``text/event-stream``, one event per piece of news:

    start    {"stream_id"}                  at once (the id the stop button sends)
    delta    {"text"}                       new text of the answer, as the model writes it
    done     {"answer_id", "prompt_id", "text", "html", "finished", "stopped", "model"}
                                            the stored answer: its final text, its safe Markdown, and
                                            whether it was cut (length limit) or stopped
    stopped  {}                             stopped before the model started (nothing stored)
    error    {"error"}                      generation failed (nothing stored)

``POST /api/chat/stop {"stream_id"}`` stops that answer where it is: it is stored as written so far
(``finished`` false), so it can be rated and the conversation goes on. A client that goes away stops its
answer too. Tokens come from the rollout engine's ``on_step`` (``Answerer.answer``): streaming does not
change what is sampled.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import AsyncIterator

from chatrlhf.feedback.answerer import Stopped
from chatrlhf.feedback.markdown import render
from chatrlhf.feedback.schema import NotFound
from chatrlhf.feedback.store import FeedbackStore

POLL_S = 0.5  # how often a silent stream checks that its client is still there


class ChatStreams:
    """The answers being streamed now: stream id -> its stop event."""

    def __init__(self):
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def open(self) -> tuple[str, threading.Event]:
        stream_id, stop = secrets.token_hex(16), threading.Event()
        with self._lock:
            self._stops[stream_id] = stop
        return stream_id, stop

    def stop(self, stream_id) -> None:
        with self._lock:
            stop = self._stops.get(stream_id) if isinstance(stream_id, str) else None
        if stop is None:
            raise NotFound("stream_id: no answer with this id is being generated (it ended, or never started)")
        stop.set()

    def close(self, stream_id: str) -> None:
        with self._lock:
            self._stops.pop(stream_id, None)


def save_answer(store: FeedbackStore, messages: list[dict], ans) -> dict:
    """Stores a chat answer (its prompt as an unqueued chat prompt); what the page needs to show and rate it."""
    store.add_prompts([messages], source="chat", queued=False)
    prompt_id = store.prompt_id_for(messages)
    answer_id = store.add_answer(prompt_id, ans.model, ans.text, ans.finished, ans.settings)
    return {"answer_id": answer_id, "prompt_id": prompt_id, "text": ans.text, "finished": ans.finished,
            "model": ans.model, "stopped": bool(ans.settings.get("stopped")), "html": str(render(ans.text))}


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_answer(request, store: FeedbackStore, answerer, streams: ChatStreams, model: int,
                        messages: list[dict], seed: int) -> AsyncIterator[str]:
    """The events of one streamed answer (see the module docstring)."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()
    stream_id, stop = streams.open()

    def on_text(text: str) -> None:  # on the generating thread
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    work = loop.run_in_executor(None, lambda: answerer.answer(model, messages, seed, on_text=on_text, stop=stop))
    try:
        yield event("start", {"stream_id": stream_id})
        # on_text's pieces are queued before the work's result is: none is left behind when it is done
        while not work.done() or not pieces.empty():
            try:
                text = await asyncio.wait_for(pieces.get(), timeout=POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    stop.set()
                continue
            yield event("delta", {"text": text})
        yield event("done", save_answer(store, messages, work.result()))
    except Stopped:
        yield event("stopped", {})
    except Exception as err:  # noqa: BLE001 - the response has started: the error goes to the page as an event
        yield event("error", {"error": f"{type(err).__name__}: {err}"})
    finally:  # also when the client left mid-answer (the response is cancelled): the model stops
        stop.set()
        streams.close(stream_id)
