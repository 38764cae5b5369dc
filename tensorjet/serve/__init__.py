"""The OpenAI-compatible HTTP server: `tensorjet serve`, or `build_app(llm, name)` for an ASGI app."""
