from shared.service import main

from .service import build

main("freshness-auditor", "Checks what the caches served against the source of truth", build)
