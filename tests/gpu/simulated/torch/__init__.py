"""A simulated torch for the GPU check's own test: CUDA is there, allocations are only
what the allocating process's command line says (``tests/gpu/simulated/pynvml.py`` reads
them)."""

from types import SimpleNamespace
from typing import Any

__version__ = "2.9.0+cu130"
uint8 = "uint8"
version = SimpleNamespace(cuda="13.0")
cuda = SimpleNamespace(synchronize=lambda: None, is_available=lambda: True,
                       device_count=lambda: 1, mem_get_info=lambda: (0, 140 * 2**30))


def empty(*_args: Any, **_kwargs: Any) -> None:
    return None
