"""One OpenAI-compatible endpoint in front of every managed vLLM server.

The gateway routes each request by its ``model`` field to a managed server, starts the
registry or models-file entry it names on first use, and stops the servers it started when
they have been idle. Modules:

- :mod:`.settings`: the gateway's options and API keys (no aiohttp);
- :mod:`.pool`: which servers exist, single-flight starts, idle stop, eviction;
- :mod:`.metrics`: the gateway's own Prometheus counters and histograms;
- :mod:`.proxy`: the aiohttp application (routing, auth, streaming pass-through);
- :mod:`.service`: running it in the foreground or background, its record for ``status``.

aiohttp is imported only by :mod:`.proxy` and :mod:`.service`, never on ``status``'s path.
"""
