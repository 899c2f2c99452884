"""cmw-vllm: run and look after vLLM inference servers on your own machines."""

__version__ = "0.1.0"
