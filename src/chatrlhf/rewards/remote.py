"""``RemoteSource``: a reward scored by an HTTP server, ``--reward http://HOST:PORT/PATH`` (or ``https://``).

The contract (docs/rewards.md, "Remote rewards"; ``chatrlhf serve-reward`` implements the server side):

    POST PATH   {"prompts":   [[{"role": ..., "content": ...}, ...], ...],   one message list per answer
                 "responses": [str, ...],                                    the answer texts
                 "finished":  [bool, ...],                                   False: cut at the token limit
                 "meta":      [{...}, ...]}                                  the data rows' extra columns
    200         {"scores": [float, ...]}                                     one finite number per answer

Only the standard library is used (``urllib.request``). Each batch is one POST with a timeout (``TIMEOUT_S``);
a refused or dropped connection, a timeout or an HTTP 5xx is tried again, up to ``TRIES`` tries in all, after
waits of ``BACKOFF_S``, 2 * ``BACKOFF_S``, ... Any other failure (401, a 4xx, a response that is not the
contract) raises at once. ``?timeout_s=SECONDS`` and ``?tries=N`` in the spec override the constants for one
source and are not sent to the server. When ``CHATRLHF_REWARD_TOKEN`` is set, it is sent as
``Authorization: Bearer <token>``. Redirects are not followed, so the token never leaves for another host.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import torch

from chatrlhf.limits import InputError, parse_json
from chatrlhf.rewards.contract import RewardBatch, RewardSource

TIMEOUT_S = 30.0
"""Seconds one POST may take, connecting and reading included (``?timeout_s=`` in the spec overrides it)."""
TRIES = 3
"""POSTs of one batch at most, the first included, when the connection fails or the server answers 5xx
(``?tries=`` overrides it)."""
BACKOFF_S = 0.5
"""Wait before the second try; it doubles before each further one (0.5 s, 1 s, ...)."""
TOKEN_ENV = "CHATRLHF_REWARD_TOKEN"
"""Environment variable holding the access token sent as ``Authorization: Bearer``."""
MAX_RESPONSE_BYTES = 16 << 20
"""Largest response read (bytes): scores for any batch fit in far less; more is not the contract."""
MAX_TRIES = 10


class RemoteRewardError(OSError):
    """The reward server could not be reached or did not answer by the contract; the message is one line
    naming the URL. An OSError, so the CLI prints it as one line (``chatrlhf ppo: error: ...``)."""


class _Retry(Exception):
    """A failure worth another try (connection, timeout, 5xx); its message says what happened."""


def is_remote_spec(spec: str) -> bool:
    """Whether a reward spec names an HTTP reward server."""
    return spec.startswith(("http://", "https://"))


def _option(spec: str, name: str, text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # NaN fails too
        raise ValueError(f"reward spec {spec!r}: {name}={text!r} must be a number in [{low:g}, {high:g}]")
    return value


def parse_remote_spec(spec: str) -> tuple[str, float, int]:
    """``http://h:8001/score?timeout_s=60&tries=5`` -> (``http://h:8001/score``, 60.0, 5); raises naming the spec.

    ``timeout_s`` and ``tries`` are taken out of the query; its other parameters stay in the URL."""
    parts = urlsplit(spec)
    try:
        parts.port  # noqa: B018 - reading it validates the port (ValueError: not a number, out of range)
    except ValueError as err:
        raise ValueError(f"reward spec {spec!r}: {err}; write http://HOST:PORT/PATH") from None
    if not parts.hostname:
        raise ValueError(f"reward spec {spec!r} names no host; write http://HOST:PORT/PATH, e.g. "
                         "http://127.0.0.1:8001/score")
    timeout_s, tries, kept = TIMEOUT_S, TRIES, []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "timeout_s":
            timeout_s = _option(spec, key, value, 0.001, 86400)
        elif key == "tries":
            tries = int(_option(spec, key, value, 1, MAX_TRIES))
            if str(tries) != value.strip():
                raise ValueError(f"reward spec {spec!r}: tries={value!r} must be a whole number in [1, {MAX_TRIES}]")
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept), fragment="")), timeout_s, tries


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError(3xx): the Authorization header must not follow a redirect


def _server_message(err: urllib.error.HTTPError) -> str:
    """The ``{"error": ...}`` of a refusal, else the start of its body, as one short line."""
    try:
        raw = err.read(4096)
    except (OSError, http.client.HTTPException):
        raw = b""
    try:
        text = str(json.loads(raw)["error"])
    except (ValueError, TypeError, KeyError):
        text = raw.decode("utf-8", "replace")
    return " ".join(text.split())[:300] or str(err.reason)


class RemoteSource(RewardSource):
    """Scores each batch by one POST to a reward server (the module docstring has the contract)."""

    short_name = "remote"

    def __init__(self, spec: str, backoff_s: float = BACKOFF_S):
        self.url, self.timeout_s, self.tries = parse_remote_spec(spec)
        self.name = spec
        self.backoff_s = backoff_s
        self.token = os.environ.get(TOKEN_ENV) or None
        self._opener = urllib.request.build_opener(_NoRedirect)

    @property
    def where(self) -> str:
        return f"reward server {self.url}"

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        n = len(batch.responses)
        if n == 0:
            return torch.zeros(0, dtype=torch.float32)
        reply = self._post(self._body(batch, n))
        return torch.tensor(self._scores(reply, n), dtype=torch.float32)  # (B,)

    def _body(self, batch: RewardBatch, n: int) -> bytes:
        payload = {"prompts": batch.prompts, "responses": batch.responses, "finished": [bool(f) for f in batch.finished],
                   "meta": batch.meta or [{} for _ in range(n)]}
        try:
            return json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as err:  # a meta value that JSON cannot hold (NaN, a date, an array)
            raise ValueError(f"{self.where}: the batch cannot be sent as JSON ({err}); the data rows' extra "
                             "columns (meta) must be JSON values: text, finite numbers, booleans, lists, objects") from None

    def _post(self, body: bytes) -> bytes:
        """The response body of the first try that gets one; RemoteRewardError once ``tries`` have failed."""
        failure = None
        for attempt in range(self.tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._send(body)
            except _Retry as err:
                failure = err
        raise RemoteRewardError(f"{self.where}: {failure} (tried {self.tries} times, {self.timeout_s:g} s timeout "
                                "each; ?tries=N and ?timeout_s=SECONDS in the spec change these)")

    def _send(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "chatrlhf"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as reply:
                data = reply.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as err:  # before URLError: it is one
            raise self._refusal(err, len(body)) from None
        except urllib.error.URLError as err:
            raise _Retry(self._unreachable(err.reason)) from None
        except (OSError, http.client.HTTPException) as err:  # a timeout or a dropped connection while reading
            raise _Retry(self._unreachable(err)) from None
        if len(data) > MAX_RESPONSE_BYTES:
            raise RemoteRewardError(f"{self.where}: the response is over {MAX_RESPONSE_BYTES} bytes; the contract's "
                                    "answer is {\"scores\": [...]}, one number per answer")
        return data

    def _unreachable(self, reason) -> str:
        if isinstance(reason, ConnectionRefusedError):
            return f"connection refused: is `chatrlhf serve-reward` running at {self.url}?"
        if isinstance(reason, TimeoutError):
            return f"no answer within {self.timeout_s:g} s"
        return f"cannot reach the server ({type(reason).__name__}: {reason})"

    def _refusal(self, err: urllib.error.HTTPError, size: int) -> Exception:
        """The error for an HTTP status other than 200: ``_Retry`` for a 5xx, else a RemoteRewardError."""
        code, message = err.code, _server_message(err)
        if code >= 500:
            return _Retry(f"HTTP {code}: {message}")
        if code == 401:
            fix = (f"the server refused the token in {TOKEN_ENV}; set it to the server's --token" if self.token else
                   f"the server needs an access token; set {TOKEN_ENV} to the server's --token")
            return RemoteRewardError(f"{self.where}: HTTP 401: {fix}")
        if code == 413:
            return RemoteRewardError(f"{self.where}: HTTP 413: the batch ({size} bytes) is over the server's limit "
                                     f"({message}); raise the server's --max_request_bytes or score smaller batches")
        if 300 <= code < 400:
            return RemoteRewardError(f"{self.where}: HTTP {code}: redirects are not followed (the token would go "
                                     f"along); point --reward at {err.headers.get('Location', 'the final URL')}")
        return RemoteRewardError(f"{self.where}: HTTP {code}: {message}")

    def _scores(self, data: bytes, n: int) -> list[float]:
        """The ``n`` finite scores of a response, or a RemoteRewardError naming what is wrong."""
        try:
            reply = parse_json(data, f"{self.where}: the response")
        except InputError as err:
            raise RemoteRewardError(str(err)) from None
        except ValueError as err:  # json.JSONDecodeError
            raise RemoteRewardError(f"{self.where}: the response is not JSON ({err}); it starts "
                                    f"{data[:80].decode('utf-8', 'replace')!r}") from None
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list):
            raise RemoteRewardError(f"{self.where}: the response has no \"scores\" list (got "
                                    f"{json.dumps(reply)[:120]}); the contract's answer is {{\"scores\": [...]}}")
        if len(scores) != n:
            raise RemoteRewardError(f"{self.where}: {len(scores)} scores came back for {n} answers; the server must "
                                    "return one score per answer, in the order of \"responses\"")
        for i, score in enumerate(scores):
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise RemoteRewardError(f"{self.where}: scores[{i}] is {json.dumps(score)[:60]}, not a finite "
                                        "number; every score must be one")
        return [float(s) for s in scores]
