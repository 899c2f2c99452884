"""A request's body: reading it within the size limit, decoding it, finding its ``model``.

Everything here does work linear in the body and never holds the event loop for long:

- a ``Content-Encoding`` (gzip, deflate) is decoded as a stream, in pieces, counted against
  the body limit, so a small bomb stops at the limit instead of filling memory; other
  encodings are refused (415). The body is forwarded decoded, without ``Content-Encoding``;
- JSON up to ``INLINE_BYTES`` is parsed with :func:`json.loads` after a nesting check that
  costs two ``bytes.count`` calls for ordinary bodies. A larger body is scanned in a
  worker thread for the top-level ``model`` only: what cannot hold it is passed over with
  one possessive regular expression per ``SKIP_SPAN`` bytes (so the thread hands the GIL
  back to the loop every few ms), a long string with ``bytes.find``; strings must end and
  brackets pair up;
- multipart forms are split at their boundary with ``bytes.find`` (no regular expression
  over the whole body), larger ones in the worker thread too.

A body the gateway cannot read (bad JSON, nesting deeper than ``MAX_DEPTH``, a broken gzip
stream) is a 400 before any server is started.
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import accumulate
from typing import TYPE_CHECKING, Any, TypeVar

from cmw_vllm.errors import GatewayRefusal as Refusal

if TYPE_CHECKING:
    from aiohttp import web

T = TypeVar("T")

INVALID = "invalid_request_error"  # OpenAI's error type for a request it cannot use
MAX_DEPTH = 128  # JSON nesting the gateway accepts (vLLM's requests nest a few levels)
MAX_MODEL_CHARS = 4096  # a model may be named by its directory (PATH_MAX)
INLINE_BYTES = 256 * 1024  # bodies up to this size are read on the event loop
DECODE_PIECE = 256 * 1024  # decompressed bytes produced per zlib call
DECODE_YIELD = 4 * 1024 * 1024  # decoded bytes between two yields to the event loop
# Content codings the gateway decodes; zlib's wbits 32+15 reads a gzip or a zlib header.
DECODED = frozenset({"gzip", "x-gzip", "deflate"})

_WS = rb"[ \t\r\n]*"
_LOOKS_JSON = re.compile(_WS + rb"\{")
# One JSON string, or the rest of the body when a string never ends: every start consumes
# what it scanned, so removing them all is linear whatever the input.
_STRING_OR_REST = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.S)
_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_STRING_AT = re.compile(_STRING, re.S)
# Whatever stands before the next string or bracket: scalars, commas, colons.
_FILLER = re.compile(rb'[^"\[\]{}]*+')


def _nested(levels: int) -> bytes:
    """A pattern for JSON text whose brackets pair up within ``levels`` levels."""
    inner = _nested(levels - 1) if levels > 1 else None
    nested = rb"|\[" + inner + rb"\]|\{" + inner + rb"\}" if inner else b""
    return rb'(?:[^"\[\]{}]++|' + _STRING + nested + rb")*+"


SKIP_LEVELS = 4
_SUBTREE = rb"|\[" + _nested(SKIP_LEVELS - 1) + rb"\]|\{" + _nested(SKIP_LEVELS - 1) + rb"\}"
# What the scan can pass over in one C call: scalars, strings, and whole arrays and objects
# up to SKIP_LEVELS deep; in the top-level object, also `"model": "..."` pairs (the group
# keeps the last) but no other "model" string. Possessive throughout: no backtracking.
_SKIP_DEEP = re.compile(_nested(SKIP_LEVELS), re.S)
_SKIP_TOP = re.compile(rb'(?:[^"\[\]{}]++|"(?!model")' + _STRING[1:] + rb'|"model"' + _WS
                       + rb"+:" + _WS + rb"+(" + _STRING + rb")" + _SUBTREE + rb")*+", re.S)
SKIP_SPAN = 256 * 1024  # bytes one skip may cover: it holds the GIL while it runs
_COLON = re.compile(_WS + rb":" + _WS)
_END = re.compile(_WS + rb"\Z")
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
# Opening brackets become 1 and closing ones -1 (as signed bytes).
_DEPTH_STEP = bytes.maketrans(_BRACKETS, b"\x01\xff\x01\xff")
_CLOSER = {ord("{"): ord("}"), ord("["): ord("]")}

_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.I)
_DISPOSITION = re.compile(rb"(?im)^content-disposition[ \t]*:([^\r\n]{0,4096})(?=\r\n)")
_FIELD_NAME = re.compile(rb'(?:^|;)[ \t]*name[ \t]*=[ \t]*(?:"([^"\r\n]*)"|([^;\s"]+))', re.I)

_executor: ThreadPoolExecutor | None = None


def bad_body(message: str) -> Refusal:
    """A 400 for a body the gateway cannot read."""
    return Refusal(400, message, INVALID)


def _too_large(limit: int) -> Refusal:
    return Refusal(413, f"request body is over the gateway's limit of {limit} bytes",
                   "RequestTooLargeError")


# ------------------------------------------------------------------------- reading

def content_codings(header: str | None) -> list[str]:
    """The codings of a ``Content-Encoding`` header, without ``identity``.

    Raises:
        Refusal: A coding the gateway does not decode, or more than one (415).
    """
    if not header:
        return []
    codings = [c.strip().lower() for c in header.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if len(codings) > 1 or any(c not in DECODED for c in codings):
        raise Refusal(415, f"Content-Encoding {header[:100]!r} is not supported (gzip or "
                      "deflate, once)", INVALID)
    return codings


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, decoded, at most ``limit`` bytes.

    Raises:
        Refusal: Over the limit (413), an unsupported encoding (415), a broken one (400).
    """
    from aiohttp import web

    if request.content_length is not None and request.content_length > limit:
        raise Refusal(413, f"request body of {request.content_length} bytes is over the "
                      f"gateway's limit of {limit} bytes", "RequestTooLargeError")
    if not content_codings(request.headers.get("Content-Encoding")):
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(limit) from None
    return await _read_decoded(request, limit)


async def _read_decoded(request: web.Request, limit: int) -> bytes:
    """Decode a gzip or deflate body as it arrives, refusing it once it passes ``limit``."""
    decoder = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)
    pieces: list[bytes] = []
    raw = size = since_yield = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        raw += len(chunk)
        if raw > limit:
            raise _too_large(limit)
        data = chunk
        while True:
            try:
                piece = decoder.decompress(data, DECODE_PIECE)
            except zlib.error:
                raise bad_body("the request body is not valid gzip or deflate data") from None
            size += len(piece)
            if size > limit:
                raise _too_large(limit)
            pieces.append(piece)
            since_yield += len(piece)
            if since_yield >= DECODE_YIELD:
                since_yield = 0
                await asyncio.sleep(0)
            data = decoder.unconsumed_tail
            if decoder.eof and decoder.unused_data:  # the next gzip member
                data = decoder.unused_data
                decoder = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)
                continue
            if not data and len(piece) < DECODE_PIECE:
                break
    if raw and not decoder.eof:  # (an empty body stays empty)
        raise bad_body("the request body's gzip or deflate data ends too early")
    return b"".join(pieces)


class BodyBudget:
    """The bytes of request bodies held while their model starts, under one cap.

    Args:
        limit: Most bytes held at once (0: no cap).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes stay within the cap."""
        return not self.limit or not size or self.held + size <= self.limit

    def full(self) -> Refusal:
        """The 503 for a body that does not fit."""
        return Refusal(503, f"the gateway already holds {self.held} bytes of requests waiting "
                       f"for their model to start (limit {self.limit}); try again shortly",
                       retry_after=10)

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Count ``size`` bytes while the block runs."""
        self.held += size
        try:
            yield
        finally:
            self.held -= size


# -------------------------------------------------------------------- the model

async def find_model(body: bytes, request: web.Request) -> str | None:
    """The ``model`` a request names: JSON body, multipart field, or ``?model=``.

    Raises:
        Refusal: The body is JSON or a form the gateway cannot read, or its ``model`` is not
            a string or too long (400).
    """
    model: Any = None
    if body[:1] == b"{" or (body[:1].isspace() and _LOOKS_JSON.match(body)):
        model = json_model(body) if len(body) <= INLINE_BYTES \
            else await _off_loop(scan_json_model, body)
    else:
        content_type = request.headers.get("Content-Type", "")
        if content_type[:19].lower() == "multipart/form-data":
            model = multipart_model(body, content_type) if len(body) <= INLINE_BYTES \
                else await _off_loop(multipart_model, body, content_type)
    if model is not None and not isinstance(model, str):
        raise bad_body("`model` must be a string")
    if model and len(model) > MAX_MODEL_CHARS:
        raise bad_body(f"`model` is longer than {MAX_MODEL_CHARS} characters")
    return model or request.query.get("model") or None


async def _off_loop(func: Callable[..., T], *args: Any) -> T:
    """Run ``func`` in the gateway's body thread: the loop keeps serving meanwhile."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gateway-body")
    return await asyncio.get_running_loop().run_in_executor(_executor, func, *args)


def check_depth(body: bytes, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` (strings skipped), in C-speed passes.

    Raises:
        Refusal: Too deep (400).
    """
    if body.count(b"{") + body.count(b"[") <= limit:
        return  # the common case: too few brackets to nest that deep
    steps = _STRING_OR_REST.sub(b"", body).translate(_DEPTH_STEP, _NOT_BRACKETS)
    if max(accumulate(memoryview(steps).cast("b")), default=0) > limit:
        raise bad_body(f"the request body nests JSON deeper than {limit} levels")


def json_model(body: bytes) -> Any:
    """The top-level ``model`` of a JSON body (None when absent).

    Raises:
        Refusal: Not valid JSON, or nested too deep (400).
    """
    check_depth(body)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise bad_body("the request body is not valid JSON") from None
    return data.get("model") if isinstance(data, dict) else None


def _string_end(body: bytes, start: int) -> int:
    """Where the JSON string opened at ``start`` ends (after its closing quote)."""
    close = body.find(b'"', start + 1)
    if close > 0 and body[close - 1] != 0x5C:  # not after a backslash: it closes the string
        return close + 1
    found = _STRING_AT.match(body, start)  # escapes: let the expression pair them up
    if found is None:
        raise bad_body("the request body is not valid JSON")
    return found.end()


def scan_json_model(body: bytes) -> Any:
    """The top-level ``model`` of a JSON object, without building the object.

    Whatever cannot hold the top-level ``model`` is passed over by a regular expression,
    in spans of ``SKIP_SPAN`` bytes; the rest goes token by token. Brackets must pair up
    and nest at most ``MAX_DEPTH`` deep, strings must end; the rest of the syntax is left
    to the server. The last ``model`` key wins, as with json.loads.

    Raises:
        Refusal: The body breaks those rules, or ``model`` is not a string or null (400).
    """
    opened = _LOOKS_JSON.match(body)
    if opened is None:
        raise bad_body("the request body is not a JSON object")
    stack = bytearray(b"{")
    pos = opened.end()
    model: Any = None
    key_seen = False  # the token before was a top-level "model" string
    filler, size = _FILLER.match, len(body)
    while stack:
        if not key_seen and len(stack) + SKIP_LEVELS <= MAX_DEPTH:
            skip = _SKIP_TOP if len(stack) == 1 else _SKIP_DEEP
            skipped = skip.match(body, pos, min(pos + SKIP_SPAN, size))
            assert skipped is not None  # it matches the empty string
            if skipped.lastindex:  # a "model": "..." pair at the top
                model = _scanned_value(body, skipped.start(1), skipped.end(1))
            pos = skipped.end()
        start = filler(body, pos).end()  # type: ignore[union-attr]
        if start == size:
            raise bad_body("the request body is not valid JSON")
        char = body[start]
        end = _string_end(body, start) if char == 0x22 else start + 1
        if key_seen:
            key_seen = False
            colon = _COLON.match(body, pos)
            if colon is not None:  # it was a key: its value comes now
                string = colon.end() == start and char == 0x22
                model = _scanned_value(body, colon.end(), end if string else None)
        if char == 0x22:
            key_seen = len(stack) == 1 and end - start == 7 \
                and body.startswith(b'"model"', start)
        elif char in _CLOSER:
            stack.append(char)
            if len(stack) > MAX_DEPTH:
                raise bad_body(f"the request body nests JSON deeper than {MAX_DEPTH} levels")
        elif _CLOSER[stack.pop()] != char:
            raise bad_body("the request body is not valid JSON")
        pos = end
    if _END.match(body, pos) is None:
        raise bad_body("the request body is not valid JSON")
    return model


class _NotAString:
    """Stands for a ``model`` value that is a number, a boolean, an object or an array."""


def _scanned_value(body: bytes, value_at: int, string_end: int | None) -> Any:
    """The value of a top-level ``model`` key, at ``value_at`` (a string when it ends at
    ``string_end``)."""
    if string_end is not None:
        if string_end - value_at > MAX_MODEL_CHARS * 6 + 2:  # \uXXXX per character at most
            raise bad_body(f"`model` is longer than {MAX_MODEL_CHARS} characters")
        try:
            return json.loads(body[value_at:string_end])
        except ValueError:
            raise bad_body("`model` is not a valid JSON string") from None
    if body.startswith(b"null", value_at):
        return None
    return _NotAString()


def multipart_model(body: bytes, content_type: str) -> str | None:
    """The ``model`` field of a ``multipart/form-data`` body (the last one, as a form
    parser keeps it), found part by part with ``bytes.find``: linear in the body.
    """
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    delimiter = b"\r\n--" + (match.group(1) or match.group(2)).encode("latin-1")
    model: str | None = None
    if body.startswith(delimiter[2:]):  # the first delimiter may open the body
        at = len(delimiter) - 2
    else:
        first = body.find(delimiter)
        at = first + len(delimiter) if first >= 0 else -1
    while at >= 0 and not body.startswith(b"--", at):
        line_end = body.find(b"\r\n", at)
        if line_end < 0:
            break
        following = body.find(delimiter, line_end)
        end = following if following >= 0 else len(body)
        head_end = body.find(b"\r\n\r\n", line_end, end)
        if head_end >= 0 and _field_name(body, line_end, head_end) == b"model":
            value = body[head_end + 4:end]
            if len(value) > MAX_MODEL_CHARS * 4:
                raise bad_body(f"`model` is longer than {MAX_MODEL_CHARS} characters")
            model = value.decode("utf-8", errors="replace").strip()
        at = following + len(delimiter) if following >= 0 else -1
    return model


def _field_name(body: bytes, head_start: int, head_end: int) -> bytes | None:
    """The ``name`` of a form part, from its Content-Disposition header."""
    disposition = _DISPOSITION.search(body, head_start, head_end + 2)
    if disposition is None:
        return None
    name = _FIELD_NAME.search(disposition.group(1))
    return None if name is None else (name.group(1) if name.group(1) is not None
                                      else name.group(2))
