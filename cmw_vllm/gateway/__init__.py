"""One OpenAI-compatible endpoint in front of every managed vLLM server.

The gateway routes each request by its ``model`` field to a managed server, starts the
registry or models-file entry it names on first use, and stops the servers it started when
they have been idle. Modules:

- :mod:`.settings`: the gateway's options and API keys (no aiohttp);
- :mod:`.pool`: which servers exist, single-flight starts, idle stop, eviction;
- :mod:`.metrics`: the gateway's own Prometheus counters and histograms;
- :mod:`.body`: reading a request's body (size limit, gzip) and finding its ``model``;
- :mod:`.proxy`: the aiohttp application (routing, auth, streaming pass-through);
- :mod:`.edge`: its connections before a route runs (read timeouts, per-client cap, JSON
  answers and short log lines for malformed requests, the server loop);
- :mod:`.headers`: which headers cross it (hop-by-hop, ``X-Forwarded-For``, trusted proxies);
- :mod:`.logfile`: its log file, rotated by size, other libraries' lines scrubbed;
- :mod:`.service`: running it in the foreground or background, its record for ``status``.

aiohttp is imported only by :mod:`.proxy`, :mod:`.edge` and :mod:`.service`, never on
``status``'s path.
"""
