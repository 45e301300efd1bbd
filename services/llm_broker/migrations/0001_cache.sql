-- Semantic tier of the LLM response cache. One row per cached response;
-- matching is always inside one partition (exact scan over the partition's
-- live rows, which are few), so no ANN index is needed.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS llm.entries (
    id              text PRIMARY KEY,          -- the exact key
    partition       text NOT NULL,
    user_id         text NOT NULL,             -- who asked (forget and invalidation)
    volatility      text NOT NULL,
    embedding_model text NOT NULL,
    embedding       vector NOT NULL,
    entry           bytea NOT NULL,            -- msgpack of policy.Entry
    expires_at      double precision NOT NULL  -- absolute, epoch seconds
);
CREATE INDEX IF NOT EXISTS entries_partition ON llm.entries (partition, expires_at);
CREATE INDEX IF NOT EXISTS entries_user ON llm.entries (user_id, volatility);
