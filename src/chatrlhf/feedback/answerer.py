"""The models behind ``chatrlhf serve``: answers for the chat page and the queue's answer pairs.

Models load once at start-up. Generation is one call at a time (a lock): on a CPU two concurrent calls only
share the cores, and on a GPU they would share its memory. A queued prompt's pair is two answers:

    two models           slot a and b from the two models, their order shuffled per prompt
                         (seeded by the prompt id) so position tells the annotator nothing
    one model            two samples of it, drawn as one batch of two (about the time of one answer)

Both are seeded with ``seed + prompt_id``.

The same prompt id and settings give the same pair, so a restarted server writes the same answers.
``PairWorker`` fills pairs in queue order in a background thread, ahead of the annotators.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from chatrlhf.config import GenerationConfig, ModelLoadConfig
from chatrlhf.feedback.store import FeedbackStore


@dataclass
class Answer:
    text: str
    finished: bool  # False: cut at max_new_tokens
    model: str
    settings: dict  # sampling settings and seed, stored with the answer


class Answerer:
    """Loaded models and their sampling settings; ``answer`` is thread-safe."""

    def __init__(self, models: list[ModelLoadConfig], generation: GenerationConfig | None = None, *, seed: int = 0,
                 system: str | None = None, max_history_tokens: int = 1536):
        from chatrlhf.chat import load_for_chat

        if not models:
            raise ValueError("--model.name_or_path: name a model dir or built-in model")
        generation = generation or GenerationConfig(max_new_tokens=256, temperature=0.7, top_p=0.9)
        self.names = [m.name_or_path for m in models]
        self.system, self.seed, self.max_history_tokens = system, seed, max_history_tokens
        self.backend, self.sampling = generation.backend, generation.sampling()
        self._loaded = []  # (engine, tokenizer, eos ids, pad id) per model; a vLLM engine is built once here
        self._lock = threading.Lock()
        try:
            for model_cfg in models:
                engine, tokenizer, eos = load_for_chat(model_cfg, generation.backend, seed=seed,
                                                       max_model_len=max_history_tokens + generation.max_new_tokens)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
                self._loaded.append((engine, tokenizer, eos, pad))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Frees the models' generation engines (vLLM ones hold memory until closed), after the answer being
        generated, if any."""
        with self._lock:
            for engine, *_ in self._loaded:
                engine.close()

    def answer(self, model_index: int, messages: list[dict], seed: int, *,
               on_text: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> Answer:
        """One sampled answer of model ``model_index`` to the conversation ``messages`` (ends with a user turn).

        Streaming (the chat page): ``on_text(new_text)`` is called, on this thread, with each piece of text as
        it is generated; setting ``stop`` ends the answer where it is (``finished`` False, ``settings`` say
        ``stopped``). Neither changes what is sampled: a streamed answer equals the unstreamed one."""
        streamer = None if on_text is None and stop is None else _Streamer(self._loaded[model_index][1], on_text, stop)
        ans = self._sample(model_index, messages, seed, 1, streamer)[0]
        if streamer is not None and streamer.stopped and not ans.finished:
            ans.settings["stopped"] = True
        return ans

    def _sample(self, model_index: int, messages: list[dict], seed: int, n: int, streamer=None) -> list[Answer]:
        """``n`` answers to ``messages`` sampled as one batch (one generator seeded with ``seed``)."""
        from chatrlhf.chat import fit_history
        from chatrlhf.rollout import decode_responses

        if not 0 <= model_index < len(self.names):
            raise IndexError(f"model must be 0..{len(self.names) - 1}, got {model_index}")
        engine, tokenizer, eos, pad = self._loaded[model_index]
        ids, _ = fit_history(tokenizer, self.system, messages, self.max_history_tokens)
        input_ids = torch.tensor([ids] * n, dtype=torch.long, device=engine.device)  # (n, P)
        with self._lock, torch.no_grad():
            if streamer is not None and streamer.stop is not None and streamer.stop.is_set():
                raise Stopped("stopped before it started")
            generator = torch.Generator(device=engine.device).manual_seed(seed)
            rollout = engine.generate(input_ids, torch.ones_like(input_ids), self.sampling, eos_token_ids=eos,
                                      pad_token_id=pad, generator=generator,
                                      on_step=None if streamer is None else streamer.step(eos))
        settings = {**asdict(self.sampling), "seed": seed, "system": self.system}
        return [Answer(text, bool(done), self.names[model_index], {**settings, "sample": i})
                for i, (text, done) in enumerate(zip(decode_responses(tokenizer, rollout), rollout.finished.tolist()))]

    def pair(self, prompt_id: int, messages: list[dict]) -> tuple[Answer, Answer]:
        """Answers a and b of a queued prompt (see the module docstring)."""
        seed = self.seed + prompt_id
        if len(self.names) == 1:
            a, b = self._sample(0, messages, seed, 2)  # one batch of two: about the time of one answer
            return a, b
        order = [0, 1]
        random.Random(prompt_id).shuffle(order)
        return self.answer(order[0], messages, seed), self.answer(order[1], messages, seed)


class Stopped(Exception):
    """A streamed answer stopped while it waited for the model (another answer was being generated)."""


class _Streamer:
    """Turns the rollout engine's per-step tokens (``on_step``) into new text for ``on_text``, and ``stop``
    into the engine's stop. Row 0's tokens up to its first EOS are decoded whole each step (a token can
    change how the ones before it decode); text ending in an incomplete character waits for the next token."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, stop: threading.Event | None):
        self.tokenizer, self.on_text, self.stop = tokenizer, on_text, stop
        self.sent, self.stopped = "", False

    def step(self, eos: list[int]) -> Callable[[torch.Tensor], bool]:
        def on_step(tokens: torch.Tensor) -> bool:
            if self.on_text is not None:
                row = tokens[0].tolist()
                ends = [i for i, t in enumerate(row) if t in eos]
                text = self.tokenizer.decode(row[:ends[0]] if ends else row, skip_special_tokens=True).lstrip()
                if not text.endswith("\ufffd") and text.startswith(self.sent) and len(text) > len(self.sent):
                    self.on_text(text[len(self.sent):])
                    self.sent = text
            self.stopped = self.stop is not None and self.stop.is_set()
            return self.stopped

        return on_step


class PairWorker:
    """Generates the answer pairs of queued prompts in one background thread: first the prompts a page is
    waiting for (``request``), then, with ``pregenerate``, the rest of the queue in order.

    ``fill(n)`` does the work synchronously (tests call it); ``start()`` runs it forever, waking when
    ``wake()`` or ``request()`` is called (prompts imported, a page waiting) or every ``poll_s`` seconds. A
    prompt requested by several pages at once is generated once.
    """

    def __init__(self, store: FeedbackStore, answerer: Answerer, poll_s: float = 5.0, pregenerate: bool = True):
        self.store, self.answerer, self.poll_s, self.pregenerate = store, answerer, poll_s, pregenerate
        self._wanted: dict[int, None] = {}  # requested prompt ids, in request order
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: str | None = None  # the last generation failure, shown on the pages
        self.failed: set[int] = set()  # prompt ids whose generation failed; passed over until a restart
        self.busy_with: int | None = None  # the prompt id being answered now

    def fill(self, limit: int | None = None) -> int:
        """Generates up to ``limit`` missing pairs (None: all) in queue order, passing over prompts that
        failed before; returns how many it generated."""
        done = 0
        while (limit is None or done < limit) and (prompt_id := self._next()) is not None:
            try:
                self.answer_prompt(prompt_id)
            except Exception:
                self.failed.add(prompt_id)  # one bad prompt must not hold up the rest of the queue
                raise
            done += 1
        return done

    def _next(self) -> int | None:
        with self._lock:
            for prompt_id in list(self._wanted):
                if prompt_id in self.failed or self.store.pair(prompt_id) is not None:
                    del self._wanted[prompt_id]
                else:
                    return prompt_id
        if not self.pregenerate:
            return None
        missing = self.store.prompts_missing_answers(limit=len(self.failed) + 1)
        return next((p for p in missing if p not in self.failed), None)

    def request(self, prompt_id: int) -> None:
        """A page waits for this prompt's pair: it goes before the rest of the queue."""
        with self._lock:
            self._wanted[prompt_id] = None
        self._wake.set()

    def answer_prompt(self, prompt_id: int) -> None:
        """Generates and stores the pair of one prompt (a slot filled meanwhile keeps its first answer)."""
        self.busy_with = prompt_id
        try:
            a, b = self.answerer.pair(prompt_id, self.store.prompt(prompt_id)["messages"])
        finally:
            self.busy_with = None
        for slot, ans in (("a", a), ("b", b)):
            self.store.add_answer(prompt_id, ans.model, ans.text, ans.finished, ans.settings, slot=slot)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="chatrlhf-pairs", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.fill(limit=1):
                    continue
            except Exception as err:  # noqa: BLE001 - a bad prompt must not stop the server; shown on the pages
                self.error = f"prompts {sorted(self.failed)} not answered: {type(err).__name__}: {err}"
            self._wake.wait(self.poll_s)  # nothing to do (or a failure): until woken or poll_s
            self._wake.clear()
