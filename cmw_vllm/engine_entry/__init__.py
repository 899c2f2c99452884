"""Scripts that run in vLLM's own interpreter (standard library only; see vllm_serve.py)."""
