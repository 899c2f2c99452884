"""Prove that a running server does its job: one small request for its task, with timings.

- ``generate``: a streamed chat completion; time to first token, tokens per second, the
  reply, and the prompt/completion token counts the server reports in its usage.
- ``embed``: embeddings of a few inputs; the dimension and the time taken.
- ``score``: a query against a few documents (``/rerank``, else ``/score``); the ranking.
- ``classify``: a classification of a sample input (``/classify``); the label.

:func:`run_check` returns a :class:`CheckResult` and raises :class:`InferenceCheckError` (with
why) when the server fails the test. requests is imported inside the functions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cmw_vllm.errors import InferenceCheckError
from cmw_vllm.health_check import auth_headers
from cmw_vllm.vocab import TASKS, Task

if TYPE_CHECKING:
    import requests

DEFAULT_PROMPT = "Say hello in one short sentence."
DEFAULT_MAX_TOKENS = 32
DEFAULT_TIMEOUT = 60.0
EMBED_INPUTS = (
    "vLLM serves large language models.",
    "The quick brown fox jumps over the lazy dog.",
    "Привет, как дела?",
)
SCORE_QUERY = "What does vLLM do?"
SCORE_DOCUMENTS = (
    "vLLM is a fast inference and serving engine for large language models.",
    "The Eiffel Tower is in Paris.",
    "Bananas are rich in potassium.",
)
CLASSIFY_INPUT = "I love how fast this server answers!"
_TASK_NOUNS = {
    Task.GENERATE: "a chat model",
    Task.EMBED: "an embedding model",
    Task.SCORE: "a scoring (rerank) model",
    Task.CLASSIFY: "a classification model",
}


@dataclass
class RankedDocument:
    """One document of a score/rerank test, in ranked order."""

    index: int
    score: float
    document: str


@dataclass
class CheckResult:
    """What one inference test measured.

    Common attributes: ``task``, ``model``, ``base_url``, ``endpoint`` and ``total_s``
    (seconds from sending the request to the end of the answer). The others are filled for
    their task only.

    Attributes:
        ttft_s: generate: seconds to the first generated text.
        tokens_per_s: generate: completion tokens / total time.
        decode_tokens_per_s: generate: tokens after the first / time after the first.
        reply: generate: the generated text.
        finish_reason: generate: why generation stopped (``stop``, ``length``).
        prompt_tokens: Prompt tokens, from the server's usage figures.
        completion_tokens: generate: completion tokens, from the server's usage figures.
        streamed_chunks: generate: chunks that carried a token.
        inputs: embed/classify: the texts sent.
        dimension: embed: length of each embedding vector.
        query: score: the query.
        ranking: score: the documents, best first.
        label: classify: the predicted label of the first input.
        num_classes: classify: number of classes.
        probs: classify: class probabilities of the first input.
    """

    task: str
    model: str
    base_url: str
    endpoint: str
    total_s: float
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    reply: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    streamed_chunks: int | None = None
    inputs: list[str] = field(default_factory=list)
    dimension: int | None = None
    query: str | None = None
    ranking: list[RankedDocument] = field(default_factory=list)
    label: str | None = None
    num_classes: int | None = None
    probs: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Stable JSON keys: the common ones plus those of the task."""

        def r(value: float | None, digits: int = 4) -> float | None:
            return round(value, digits) if value is not None else None

        out: dict[str, Any] = {
            "ok": True,
            "task": self.task,
            "model": self.model,
            "url": self.base_url,
            "endpoint": self.endpoint,
            "total_s": r(self.total_s),
        }
        if self.task == Task.GENERATE:
            out.update(
                ttft_s=r(self.ttft_s),
                tokens_per_s=r(self.tokens_per_s, 2),
                decode_tokens_per_s=r(self.decode_tokens_per_s, 2),
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                finish_reason=self.finish_reason,
                reply=self.reply,
            )
        elif self.task == Task.EMBED:
            out.update(inputs=len(self.inputs), dimension=self.dimension,
                       prompt_tokens=self.prompt_tokens)
        elif self.task == Task.SCORE:
            out.update(
                query=self.query,
                ranking=[
                    {"index": d.index, "score": r(d.score, 6), "document": d.document}
                    for d in self.ranking
                ],
                prompt_tokens=self.prompt_tokens,
            )
        elif self.task == Task.CLASSIFY:
            out.update(input=self.inputs[0] if self.inputs else None, label=self.label,
                       num_classes=self.num_classes, probs=[r(p, 6) for p in self.probs],
                       prompt_tokens=self.prompt_tokens)
        return out


# --------------------------------------------------------------------------- HTTP helpers


_MAX_ERROR_LINE = 200


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_ERROR_LINE else line[: _MAX_ERROR_LINE - 3] + "..."


def _first_text_line(body: str, content_type: str) -> str:
    """The first line of a text body; of an HTML page, its title or first line of text."""
    if "html" in content_type.lower() or body.lstrip().startswith("<"):
        import re

        title = re.search(r"<title[^>]*>(.*?)</title>", body, re.IGNORECASE | re.DOTALL)
        if title and title.group(1).strip():
            return title.group(1)
        body = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", body,
                      flags=re.IGNORECASE | re.DOTALL)
        body = re.sub(r"<[^>]+>", "\n", body)
    return next((line for line in body.splitlines() if line.strip()), "")


def _error_text(resp: requests.Response) -> str:
    """One line out of an error answer: the JSON ``message``, else the first line of text."""
    try:
        data = resp.json()
    except ValueError:
        text = _first_text_line(resp.text, resp.headers.get("Content-Type", ""))
        return _one_line(text or resp.reason or "")
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return _one_line(str(err["message"]))
        if isinstance(err, str):
            return _one_line(err)
        for key in ("message", "detail"):
            if data.get(key):
                return _one_line(str(data[key]))
    return _one_line(json.dumps(data))


def _check_status(resp: requests.Response, url: str, task: str) -> None:
    if resp.status_code == 200:
        return
    text = _error_text(resp)
    hint = None
    if resp.status_code == 401:
        hint = "set VLLM_API_KEY to the key the server was started with"
    elif resp.status_code == 404 and "model" not in text.lower():
        path = url.split("//", 1)[-1].split("/", 1)[-1]
        hint = (f"the server does not serve /{path}: is it {_TASK_NOUNS[task]}? "
                "(pick another test with --task)")
    raise InferenceCheckError(f"{url} answered HTTP {resp.status_code}: {text}", hint=hint,
                              status=resp.status_code, body=resp.text)


def _post(
    session: requests.Session,
    url: str,
    body: dict[str, Any],
    timeout: float,
    task: str,
    *,
    stream: bool = False,
    allow_404: bool = False,
) -> requests.Response:
    import requests

    try:
        resp = session.post(url, json=body, timeout=(min(timeout, 10.0), timeout), stream=stream)
    except requests.Timeout:
        raise InferenceCheckError(f"{url} did not answer within {timeout:g}s",
                                 hint="raise --timeout, or see the server's log") from None
    except requests.ConnectionError as exc:
        raise InferenceCheckError(f"cannot reach {url}: {_reason(exc)}",
                                 hint="is the server running? (cmw-vllm status)") from None
    if allow_404 and resp.status_code == 404:
        return resp
    _check_status(resp, url, task)
    return resp


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    return text[:200]


def _json(resp: requests.Response, url: str) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        raise InferenceCheckError(f"{url} answered with a body that is not JSON") from None
    if not isinstance(data, dict):
        raise InferenceCheckError(f"{url} answered with JSON that is not an object")
    return data


def _usage_int(usage: Any, key: str) -> int | None:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------- tests


@dataclass
class _Stream:
    """What a streamed chat completion carried, as it arrived."""

    begin: float
    first: float | None = None  # when the first token arrived
    last: float | None = None  # when the last token arrived
    pieces: list[str] = field(default_factory=list)
    chunks: int = 0
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    done: bool = False

    def add(self, chunk: dict[str, Any], url: str) -> None:
        """Take in one ``data:`` chunk of the stream.

        Raises:
            InferenceCheckError: The chunk reports an error.
        """
        if chunk.get("error"):
            err = chunk["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise InferenceCheckError(f"{url} failed while streaming: {msg}")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            # The first chunk only announces the role; every later one carries a token.
            if "role" in delta and not delta.get("content"):
                continue
            text = "".join(
                str(delta.get(k) or "") for k in ("reasoning_content", "reasoning", "content")
            )
            if "content" in delta or text:
                self.chunks += 1
                self.last = time.monotonic()
                if self.first is None:
                    self.first = self.last
                self.pieces.append(text)


def _read_stream(resp: requests.Response, url: str, begin: float, timeout: float) -> _Stream:
    """Read a chat completion stream to its end (``[DONE]``) within ``timeout``.

    Raises:
        InferenceCheckError: The stream took too long, broke off or carried garbage.
    """
    import requests

    stream = _Stream(begin=begin)
    deadline = begin + timeout
    try:
        for raw in resp.iter_lines(decode_unicode=False):
            if time.monotonic() > deadline:
                raise InferenceCheckError(f"{url}: the answer took longer than {timeout:g}s",
                                          hint="raise --timeout or lower --max-tokens")
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                stream.done = True
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                raise InferenceCheckError(f"{url} streamed a chunk that is not JSON: "
                                          f"{payload[:120]}") from None
            if isinstance(chunk, dict):
                stream.add(chunk, url)
    except requests.RequestException as exc:
        raise InferenceCheckError(f"{url}: the stream broke off: {_reason(exc)}") from None
    finally:
        resp.close()
    return stream


def _check_generate(
    session: requests.Session, base_url: str, model: str, prompt: str, max_tokens: int,
    timeout: float,
) -> CheckResult:
    url = f"{base_url}/v1/chat/completions"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    begin = time.monotonic()
    resp = _post(session, url, body, timeout, Task.GENERATE, stream=True)
    stream = _read_stream(resp, url, begin, timeout)
    end = time.monotonic()
    if not stream.done:
        raise InferenceCheckError(f"{url}: the stream ended without [DONE]")
    if stream.usage is None:
        raise InferenceCheckError(f"{url}: the stream carried no usage figures",
                                  hint="the server ignored stream_options.include_usage")
    completion = _usage_int(stream.usage, "completion_tokens")
    if not completion:
        raise InferenceCheckError(f"{url}: the server generated no tokens")
    total = end - begin
    first, last = stream.first, stream.last
    decode = None
    if first is not None and last is not None and completion > 1 and last > first:
        decode = (completion - 1) / (last - first)
    return CheckResult(
        task=Task.GENERATE,
        model=model,
        base_url=base_url,
        endpoint="/v1/chat/completions",
        total_s=total,
        ttft_s=(first - begin) if first is not None else None,
        tokens_per_s=completion / total if total > 0 else None,
        decode_tokens_per_s=decode,
        reply="".join(stream.pieces),
        finish_reason=stream.finish_reason,
        prompt_tokens=_usage_int(stream.usage, "prompt_tokens"),
        completion_tokens=completion,
        streamed_chunks=stream.chunks,
    )


def _check_embed(
    session: requests.Session, base_url: str, model: str, inputs: list[str], timeout: float
) -> CheckResult:
    url = f"{base_url}/v1/embeddings"
    begin = time.monotonic()
    resp = _post(session, url, {"model": model, "input": inputs}, timeout, Task.EMBED)
    data = _json(resp, url)
    total = time.monotonic() - begin
    items = data.get("data")
    if not isinstance(items, list) or len(items) != len(inputs):
        got = len(items) if isinstance(items, list) else 0
        raise InferenceCheckError(f"{url} returned {got} embeddings for {len(inputs)} inputs")
    dims = set()
    for item in items:
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(vector, list) or not vector:
            raise InferenceCheckError(f"{url} returned an empty or missing embedding")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vector):
            raise InferenceCheckError(f"{url} returned an embedding with non-finite values")
        dims.add(len(vector))
    if len(dims) != 1:
        raise InferenceCheckError(f"{url} returned embeddings of different sizes: {sorted(dims)}")
    return CheckResult(
        task=Task.EMBED, model=model, base_url=base_url, endpoint="/v1/embeddings", total_s=total,
        inputs=list(inputs), dimension=dims.pop(),
        prompt_tokens=_usage_int(data.get("usage"), "prompt_tokens"),
    )


def _check_score(
    session: requests.Session, base_url: str, model: str, query: str, documents: list[str],
    timeout: float,
) -> CheckResult:
    begin = time.monotonic()
    url = f"{base_url}/rerank"
    resp = _post(session, url, {"model": model, "query": query, "documents": documents},
                 timeout, Task.SCORE, allow_404=True)
    ranked: list[RankedDocument] = []
    if resp.status_code == 404 and "model" not in _error_text(resp).lower():
        url = f"{base_url}/score"  # older servers, or models that only score pairs
        resp = _post(session, url, {"model": model, "text_1": query, "text_2": documents},
                     timeout, Task.SCORE)
        data = _json(resp, url)
        items = data.get("data")
        key = "score"
    else:
        _check_status(resp, url, Task.SCORE)
        data = _json(resp, url)
        items = data.get("results")
        key = "relevance_score"
    total = time.monotonic() - begin
    if not isinstance(items, list) or len(items) != len(documents):
        raise InferenceCheckError(f"{url} did not score all {len(documents)} documents")
    for item in items:
        idx = item.get("index") if isinstance(item, dict) else None
        score = item.get(key) if isinstance(item, dict) else None
        if not isinstance(idx, int) or not 0 <= idx < len(documents) or \
                not isinstance(score, (int, float)) or not math.isfinite(score):
            raise InferenceCheckError(f"{url} returned a malformed result: {str(item)[:120]}")
        ranked.append(RankedDocument(index=idx, score=float(score), document=documents[idx]))
    ranked.sort(key=lambda d: d.score, reverse=True)
    return CheckResult(
        task=Task.SCORE, model=model, base_url=base_url, endpoint=url[len(base_url):],
        total_s=total, query=query, ranking=ranked,
        prompt_tokens=_usage_int(data.get("usage"), "prompt_tokens"),
    )


def _check_classify(
    session: requests.Session, base_url: str, model: str, text: str, timeout: float
) -> CheckResult:
    url = f"{base_url}/classify"
    begin = time.monotonic()
    resp = _post(session, url, {"model": model, "input": [text]}, timeout, Task.CLASSIFY)
    data = _json(resp, url)
    total = time.monotonic() - begin
    items = data.get("data")
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise InferenceCheckError(f"{url} returned no classification")
    item = items[0]
    probs = item.get("probs")
    if not isinstance(probs, list) or not probs or \
            not all(isinstance(p, (int, float)) and math.isfinite(p) for p in probs):
        raise InferenceCheckError(f"{url} returned no class probabilities")
    label = item.get("label")
    num_classes = item.get("num_classes")
    return CheckResult(
        task=Task.CLASSIFY, model=model, base_url=base_url, endpoint="/classify", total_s=total,
        inputs=[text], label=str(label) if label is not None else None,
        num_classes=num_classes if isinstance(num_classes, int) else len(probs),
        probs=[float(p) for p in probs],
        prompt_tokens=_usage_int(data.get("usage"), "prompt_tokens"),
    )


def run_check(
    base_url: str,
    model: str,
    task: str,
    *,
    prompt: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> CheckResult:
    """Send one request for ``task`` to the server and measure the answer.

    Args:
        base_url: ``http://host:port`` of the server.
        model: The served model name (what goes in the request's ``model``).
        task: ``generate``, ``embed``, ``score`` or ``classify``.
        prompt: generate: the user message; embed/classify: the (first) input text;
            score: the query. Default: a built-in sample.
        max_tokens: generate: most tokens to generate.
        api_key: Sent as ``Authorization: Bearer``; None reads ``VLLM_API_KEY`` (pass ``""``
            to send none).
        timeout: Seconds the request may take (for a stream: the whole stream).

    Returns:
        The measurements.

    Raises:
        UsageError: Unknown task or a bad ``max_tokens``/``timeout``.
        InferenceCheckError: The server is unreachable, answered an error, timed out, or gave
            an answer that does not hold up (no tokens, no usage, malformed vectors, ...).
    """
    import requests

    from cmw_vllm.errors import UsageError
    from cmw_vllm.settings import api_key as env_api_key

    if task not in TASKS:
        raise UsageError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    if max_tokens < 1:
        raise UsageError("max_tokens must be at least 1")
    if timeout <= 0:
        raise UsageError("timeout must be positive")
    base_url = base_url.rstrip("/")
    key = env_api_key() if api_key is None else (api_key or None)
    with requests.Session() as session:
        session.headers.update(auth_headers(key))
        session.trust_env = False  # a proxy from the environment must not see local traffic
        if task == Task.GENERATE:
            return _check_generate(session, base_url, model, prompt or DEFAULT_PROMPT,
                                  max_tokens, timeout)
        if task == Task.EMBED:
            inputs = [prompt, *EMBED_INPUTS[1:]] if prompt else list(EMBED_INPUTS)
            return _check_embed(session, base_url, model, inputs, timeout)
        if task == Task.SCORE:
            return _check_score(session, base_url, model, prompt or SCORE_QUERY,
                               list(SCORE_DOCUMENTS), timeout)
        return _check_classify(session, base_url, model, prompt or CLASSIFY_INPUT, timeout)
