from shared.service import main

from .service import build

main("l2-gateway", "Durable write path (JetStream) and the Redis tier of tiermem", build)
