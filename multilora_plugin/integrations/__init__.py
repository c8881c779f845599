"""Integrations with host applications.

    server.py        the HTTP server: TGI- and OpenAI-compatible routes, Prometheus /metrics, over a
                     backend (one engine in this process, or replicas on Ray Serve)
    async_engine.py  the engine behind asyncio: one step thread, a stream per request
    protocol.py      request bodies and response JSON of both APIs (shared with other hosts)
    metrics.py       an engine's metrics: what is measured, the Prometheus export
    engine_args.py   `EngineArgs`: everything needed to build an engine, as plain (picklable) data
    ray_serve.py     Ray Serve: engine replicas, adapters routed as multiplexed models, the same routes
    peft.py          `wrap(peft_model)`: serve every LoRA adapter of a PeftModel
"""
