"""The package's error hierarchy and the exit codes the CLI maps them to.

Core modules raise these; ``cli.py`` catches :class:`CmwVllmError` once and turns it into a
one-line message on stderr and the error's ``exit_code``. Exit codes are documented in
docs/commands.md and must not change meaning.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # generic failure: vLLM died during start, verification failed, ...
EXIT_USAGE = 2  # bad input (also click's own usage errors)
EXIT_NOT_RUNNING = 3  # no managed server of that name (LSB "program is not running")
EXIT_STARTING = 4  # status: the server is still starting
EXIT_TIMEOUT = 5  # start: not ready before --timeout
EXIT_CONFLICT = 6  # a port or resource held by something else
EXIT_INSUFFICIENT = 7  # not enough disk, RAM or GPU memory (preflight refused)
EXIT_ENVIRONMENT = 8  # vLLM not installed, state dir not writable, Hub unreachable, ...
EXIT_NOT_FOUND = 9  # model, repository or revision does not exist
EXIT_INTERRUPTED = 130  # Ctrl-C


class CmwVllmError(Exception):
    """Base class of every error cmw-vllm reports to the user.

    Args:
        message: One line, shown as ``Error: <message>``.
        hint: Optional second line telling the user what to do about it.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(CmwVllmError):
    """Bad input: an invalid option value, unknown name, malformed file."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A configuration value (CLI, env var, .env or models file) is invalid."""


class NotFoundError(CmwVllmError):
    """A model, repository, revision or file does not exist."""

    exit_code = EXIT_NOT_FOUND


class ConflictError(CmwVllmError):
    """Something else holds what we need (a port, a name)."""

    exit_code = EXIT_CONFLICT


class GatewayNotServerError(UsageError):
    """A command or call for vLLM servers was given a gateway's name (by its record or the
    settings of its last run)."""


class InsufficientResourcesError(CmwVllmError):
    """Not enough disk, RAM or GPU memory for what was asked."""

    exit_code = EXIT_INSUFFICIENT


class EnvironmentProblem(CmwVllmError):
    """The machine lacks something: vLLM, a writable state dir, the network."""

    exit_code = EXIT_ENVIRONMENT


class ModelUnavailableError(EnvironmentProblem):
    """A model neither on disk nor in the cache, while the Hub cannot be asked."""


class StartTimeoutError(CmwVllmError):
    """The server did not become ready before the deadline."""

    exit_code = EXIT_TIMEOUT


class ServerStartError(CmwVllmError):
    """vLLM exited during start-up.

    Args:
        message: One-line summary.
        hint: The diagnosis, when the log matched a known failure.
        log_tail: The last lines of the server's log.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None, log_tail: str = "") -> None:
        super().__init__(message, hint)
        self.log_tail = log_tail


class ServerRequestError(CmwVllmError):
    """A request to a server failed: nothing answered, it timed out, or it answered an error.

    Args:
        message: One line saying what failed.
        hint: What to do about it.
        status: The HTTP status code, when the server answered.
        body: The whole body of an error answer (shown with ``-v``).
    """

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        status: int | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.status = status
        self.body = body


class InferenceCheckError(ServerRequestError):
    """The server failed the inference check of ``test`` (the message says why)."""


class ServerNotRunningError(CmwVllmError):
    """The named server is not managed, or its process is not alive (LSB "not running")."""

    exit_code = EXIT_NOT_RUNNING


class ServerNotHealthyError(CmwVllmError):
    """The server is not in a state to answer; the exit code is its state's ``status`` code.

    Args:
        message: One line naming the server and its state.
        exit_code: The code ``status`` gives for that state.
        hint: What to look at.
    """

    def __init__(self, message: str, exit_code: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


class StopError(CmwVllmError):
    """Processes of a server survived SIGKILL."""


class DownloadError(CmwVllmError):
    """The Hub refused a request, or a file arrived incomplete."""


class DownloadCancelled(Exception):  # noqa: N818 - a signal between threads, not an error
    """Raised inside download threads after Ctrl-C so they stop at their next chunk."""


class GatewayRefusal(CmwVllmError):
    """A request the gateway answers itself with an OpenAI-style error, not a server's.

    Args:
        status: HTTP status (404 unknown model, 429 queue full, 503 start failed, ...).
        message: The error's message.
        kind: The error's ``type`` in the JSON body.
        retry_after: Seconds for a ``Retry-After`` header, if any.
        hint: What to do about it (a failed start's diagnosis).
    """

    def __init__(self, status: int, message: str, kind: str = "ServiceUnavailableError",
                 retry_after: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.status = status
        self.kind = kind
        self.retry_after = retry_after


class GatewayBodyTimeout(TimeoutError):
    """A gateway client sent no body bytes for the body timeout (answered with a 408).

    A TimeoutError, so that aiohttp's lingering read after the answer ends quietly.
    """


class GatewayStreamBroken(Exception):
    """A server's answer broke off after the gateway's client got its headers: the stream is
    cut, and the request counts as a 502 (nginx reports it in its error log).

    Args:
        response: The response whose stream was cut.
    """

    def __init__(self, response: object) -> None:
        super().__init__("upstream stream broke off")
        self.response = response


class GatewayUpstreamError(Exception):
    """A server's answer to the gateway is not HTTP the gateway can relay, or broke off
    (the client gets a 502)."""


class GatewayUpstreamConnectError(GatewayUpstreamError):
    """The gateway could not connect to a server (502; the server is marked unhealthy)."""
