"""`tensorjet eval`: measure what the engine computes against text.

`perplexity` (the API, `perplexity(llm, text)`) scores a text through the engine's prompt
log-probabilities; `cli` adds `tensorjet eval ppl`.
"""
