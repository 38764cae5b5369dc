"""`tensorjet bench` and `tensorjet tune`: measure the engine in-process or any OpenAI-compatible server.

Layout: `datasets` (workloads), `driver` (arrivals and concurrency), `offline` / `serving` (how one
request is sent), `metrics` (pure statistics), `gpu_monitor` (background sampling), `run` (one
benchmark end to end), `report` (table, JSON, plots), `sweep` / `tune`, and `cli`.
"""
