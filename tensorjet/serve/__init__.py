"""The OpenAI-compatible HTTP server: `tensorjet serve`, or `build_app(llm, options)` for an ASGI app."""
