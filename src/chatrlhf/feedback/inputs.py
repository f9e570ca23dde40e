"""Reading what a request to the feedback app carries: a JSON object or a form, ids and a seed, an upload.

Every refusal is a ``FeedbackError`` naming the field (a 400 under the app's error contract, errors.py).
JSON bodies are read by ``chatrlhf.limits.parse_json``, the one reader of untrusted JSON in chatrlhf: a key
twice, nesting over 100 levels, integers beyond 64 bits, lone surrogates, NaN/Infinity and invalid UTF-8
are refused before any route sees the data.
"""

from __future__ import annotations

import json
import re

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from chatrlhf.feedback.errors import is_json
from chatrlhf.feedback.schema import FeedbackError, shown
from chatrlhf.limits import INT_MAX, InputError, parse_json

ID_MAX = INT_MAX
"""Largest row id: SQLite's INTEGER PRIMARY KEY is a signed 64-bit number (ids start at 1)."""
SEED_MAX = INT_MAX
"""Largest chat seed: ``torch.Generator.manual_seed`` takes 0..2**64 - 1, and the seed is stored with the
answer, so it must fit a signed 64-bit number as well."""
_DIGITS = re.compile(r"\s*-?[0-9]+\s*")  # an integer as a form sends it (int() would also take "1_0", "٣")


async def read_payload(request: Request, json_only: bool = False) -> dict:
    """The body as a dict: a JSON object (``Content-Type: application/json``) or a form's text fields."""
    if is_json(request):
        try:
            data = parse_json(await request.body(), "the request body")
        except InputError as err:
            raise FeedbackError(str(err)) from None
        except json.JSONDecodeError as err:
            raise FeedbackError(f"the request body is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise FeedbackError("the request body must be a JSON object")
        return data
    if json_only:
        raise FeedbackError(f"send the body as JSON (Content-Type: application/json), not "
                            f"{shown(request.headers.get('content-type', 'no Content-Type'))}")
    form = await _form(request)
    fields: dict = {}
    for key, value in form.multi_items():
        if key in fields:  # dict(form) would keep the last one silently, as a JSON reader would
            raise FeedbackError(f"form field {shown(key)} is given twice; send it once")
        if isinstance(value, UploadFile):
            raise FeedbackError(f"form field {shown(key)} is a file; this form takes text fields only")
        fields[key] = value
    return fields


async def read_upload(request: Request, field: str) -> UploadFile:
    """The file sent as form field ``field`` (the queue's prompt-file import)."""
    upload = (await _form(request)).get(field)
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise FeedbackError(f"{field}: choose a prompt file (.jsonl, .json, .csv or .parquet with a 'prompt' column)")
    return upload


async def read_pasted(request: Request, field: str) -> list[str] | None:
    """The non-empty lines of the form's text field ``field`` (prompts pasted on the Queue page), or None
    when the form has no such text (a file upload instead)."""
    text = (await _form(request)).get(field)
    if not isinstance(text, str) or not text.strip():
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


async def _form(request: Request):
    try:
        return await request.form()
    except HTTPException as err:  # Starlette's word for a multipart body it cannot parse
        raise FeedbackError(f"the form could not be read ({err.detail}); send multipart/form-data or "
                            "application/x-www-form-urlencoded, or JSON") from None


def read_int(data: dict, field: str) -> int:
    """A row id (1..2**63 - 1): a JSON integer or a form's digits; never a float or bool (int(1.9) is 1)."""
    value = data.get(field)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value) if len(value) <= 40 else ID_MAX + 1  # int() refuses over 4,300 digits
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise FeedbackError(f"{field} must be an integer id, got {shown(value)}")
    if not 1 <= number <= ID_MAX:
        raise FeedbackError(f"{field} must be an integer id from 1 to 2**63 - 1, got {shown(value)}")
    return number


def read_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FeedbackError(f"seed must be an integer, got {shown(seed)}")
    if not 0 <= seed <= SEED_MAX:
        raise FeedbackError(f"seed must be in 0..2**63 - 1 (what the generator takes), got {shown(seed)}")
    return seed
