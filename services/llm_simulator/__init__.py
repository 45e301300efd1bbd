"""A local Anthropic-compatible Messages API *simulator* (not Claude), for tests and the demo.

It answers label-like tasks by rules over the content and free-text tasks with
text derived from the request, with realistic latency, token usage, prompt
caching and injectable faults. `rules` holds the label and reply rules,
`responder` the validation, token counts and prompt cache, `app` the HTTP
routes and settings. Run: `python -m services.llm_simulator --port 0`.
"""
