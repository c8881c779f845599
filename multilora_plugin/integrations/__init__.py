"""Integrations with host applications.

    server.py        the HTTP server: TGI- and OpenAI-compatible routes, Prometheus /metrics
    async_engine.py  the engine behind asyncio: one step thread, a stream per request
    protocol.py      request bodies and response JSON of both APIs (shared with other hosts)
    metrics.py       prometheus_client metrics of an engine
    peft.py          `wrap(peft_model)`: serve every LoRA adapter of a PeftModel
"""
