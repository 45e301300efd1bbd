"""A local Anthropic-compatible Messages API *simulator* (not Claude), for tests and the demo.

It answers label-like tasks by rules over the content and free-text tasks with
facts taken from the request and wording drawn from its exact bytes, with
realistic latency, token usage, prompt caching and injectable faults. `rules`
holds the label rules, `answers` the free-text replies, `responder` the
validation, token counts and prompt cache, `app` the HTTP routes and settings. Run: `python -m services.llm_simulator --port 0`.
"""
