-- Full text per user: search fuses vector and full-text candidates
-- (store.search), and the full-text half must read only the asking user's
-- rows. A GIN index on tsv alone finds every user's rows holding a word and
-- filters by user afterwards (3-590 ms at 100k rows, bench/results/
-- search_quality.md); a composite GIN index with the user in it (btree_gin
-- for the scalar column) intersects user and words inside the index.
-- The key is hashtext(user_id), not user_id: on user_id itself the planner
-- also uses this index for plain `user_id = $1` reads (a bitmap of all the
-- user's rows), where the (user_id, seq) btree is several times faster. The
-- queries that want it say `hashtext(user_id) = hashtext($1) AND user_id = $1`.
CREATE EXTENSION IF NOT EXISTS btree_gin;
CREATE INDEX messages_user_tsv ON l3.messages USING gin (hashtext(user_id), tsv);
DROP INDEX l3.messages_tsv;
