-- L3: the full message history of every user, for `recent` and semantic search.
-- Everything lives in schema l3 (created by the migration runner) so other
-- components can share the database without name clashes.

CREATE EXTENSION IF NOT EXISTS vector;

-- One row per message, keyed by (user_id, msg_id): the log is at-least-once,
-- so re-delivered messages must be no-ops (INSERT ... ON CONFLICT DO NOTHING).
--
-- `embedding` has no fixed dimension: each embedding model (`embedding_model`)
-- gets its own partial HNSW index over `embedding::vector(dim)`, created at
-- start-up by the store (see l3.embedding_models), so switching models never
-- mixes vector spaces and needs no table rewrite. NULL embedding: the text had
-- nothing to embed (still found by recent and full-text search).
CREATE TABLE l3.messages (
    user_id         text        NOT NULL,
    msg_id          text        NOT NULL,
    seq             bigint      NOT NULL,  -- JetStream stream sequence
    bot_id          text        NOT NULL,
    role            text        NOT NULL,
    text            text        NOT NULL,
    ts              timestamptz NOT NULL,
    embedding       vector,
    embedding_model text        NOT NULL,
    tsv             tsvector    GENERATED ALWAYS AS (to_tsvector('english'::regconfig, text)) STORED,
    PRIMARY KEY (user_id, msg_id)
);

-- recent: newest n of a user; also the candidate set of exact (per-user) search
CREATE INDEX messages_user_seq ON l3.messages (user_id, seq DESC);
-- full-text candidates (filtered by user after the bitmap scan)
CREATE INDEX messages_tsv ON l3.messages USING gin (tsv);

-- Tombstones: messages of a forgotten user up to upto_seq never come back,
-- even when the log re-delivers them after the forget.
CREATE TABLE l3.forgotten (
    user_id      text        PRIMARY KEY,
    upto_seq     bigint      NOT NULL,
    forgotten_at timestamptz NOT NULL DEFAULT now()
);

-- Per-user bookkeeping kept in step with l3.messages by upsert/forget:
-- n_rows picks the search plan (exact scan for small histories, HNSW for big
-- ones); max_seq is the newest seq of the user this tier has processed.
CREATE TABLE l3.user_state (
    user_id text   PRIMARY KEY,
    n_rows  bigint NOT NULL DEFAULT 0,
    max_seq bigint NOT NULL DEFAULT 0
);

-- Global progress through the log (the indexer's watermark: every stream
-- sequence <= applied_seq has been processed).
CREATE TABLE l3.progress (
    name        text   PRIMARY KEY,
    applied_seq bigint NOT NULL
);

-- Embedding models that have (had) vectors here and their HNSW index.
CREATE TABLE l3.embedding_models (
    model_id   text        PRIMARY KEY,
    dim        integer     NOT NULL CHECK (dim BETWEEN 1 AND 16000),
    index_name text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
