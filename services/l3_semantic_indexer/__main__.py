from shared.service import main

from .service import build

main("l3-semantic-indexer", "Full history in Postgres + pgvector: recent and semantic search", build)
