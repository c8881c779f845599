"""The hosts: what serves the engine to the world (the top of the house; nothing below imports it).

    server.py          the HTTP app factory: TGI- and OpenAI-compatible routes, Prometheus /metrics
    frontend.py        what every route shares (the Server, queuing, streams, SSE)
    routes_tgi.py      TGI's routes            routes_openai.py   OpenAI's routes (as vLLM serves them)
    protocol.py        request bodies and response JSON of both APIs
    http_errors.py     the status and body of every error        access.py   what clients may do
    metrics.py         what is measured, and its Prometheus export
    backend.py         the contract the routes need from a backend, kept by:
      engine_backend.py  an Engine in the server's process
      engine_process.py  an Engine in a process of its own (what `multilora serve` runs)
      cb_backend.py      transformers' continuous batching (`--engine transformers`)
      ray_serve/         Engine replicas on Ray Serve, adapters routed as multiplexed models
    engine_args.py     `EngineArgs`: everything needed to build an engine, as plain (picklable) data
    local.py           an app on a free local port in a background thread (demo, tests, benchmarks)
"""
