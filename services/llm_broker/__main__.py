from shared.service import main

from .service import build

main("llm-broker", "Exact and semantic response cache in front of Claude", build)
