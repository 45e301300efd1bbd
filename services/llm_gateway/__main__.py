from shared.service import main

from .service import build

main("llm-gateway", "The Anthropic Messages API over HTTP, cached by the llm-broker", build)
