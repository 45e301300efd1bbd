-- Full text per user: search fuses vector and full-text candidates
-- (store.search), and the full-text half must read only the asking user's
-- rows. A GIN index on tsv alone finds every user's rows holding a word and
-- filters by user afterwards (3-590 ms at 100k rows, bench/results/
-- search_quality.md); the composite (user_id, tsv) index, which needs
-- btree_gin for the text column, intersects user and words inside the index.
CREATE EXTENSION IF NOT EXISTS btree_gin;
CREATE INDEX messages_user_tsv ON l3.messages USING gin (user_id, tsv);
DROP INDEX l3.messages_tsv;
