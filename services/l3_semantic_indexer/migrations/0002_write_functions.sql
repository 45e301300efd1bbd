-- The two writes that race: a batch from the indexer and a forget.
--
-- Both take a transaction-scoped advisory lock per user (namespace 1815309685,
-- 'l3mu'; a batch takes its users' locks in sorted order, so no deadlock).
-- They are VOLATILE plpgsql functions: under READ COMMITTED every statement
-- in them takes a fresh snapshot, so the statements after the lock see what
-- the other side committed before releasing it. Hence:
--   forget first:  the batch's INSERT sees the tombstone and skips the rows;
--   batch first:   forget's DELETE sees the batch's rows and deletes them.
-- An in-flight batch can never resurrect a forgotten user. One call is one
-- round trip and one transaction.

CREATE FUNCTION l3.upsert_messages(
    p_user_id   text[],
    p_seq       bigint[],
    p_msg_id    text[],
    p_bot_id    text[],
    p_role      text[],
    p_text      text[],
    p_ts        timestamptz[],
    p_embedding vector[],
    p_model     text,
    p_watermark bigint DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    u text;
    inserted bigint;
BEGIN
    FOR u IN SELECT DISTINCT x FROM unnest(p_user_id) AS x ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(1815309685, hashtext(u));
    END LOOP;

    WITH input AS (
        SELECT *
        FROM unnest(p_user_id, p_seq, p_msg_id, p_bot_id, p_role, p_text, p_ts, p_embedding)
             AS t(user_id, seq, msg_id, bot_id, role, text, ts, embedding)
    ), ins AS (
        INSERT INTO l3.messages AS m
               (user_id, msg_id, seq, bot_id, role, text, ts, embedding, embedding_model)
        SELECT i.user_id, i.msg_id, i.seq, i.bot_id, i.role, i.text, i.ts, i.embedding, p_model
        FROM input i
        LEFT JOIN l3.forgotten f ON f.user_id = i.user_id
        WHERE f.upto_seq IS NULL OR i.seq > f.upto_seq
        ON CONFLICT (user_id, msg_id) DO NOTHING
        RETURNING m.user_id
    ), added AS (
        SELECT user_id, count(*) AS n FROM ins GROUP BY user_id
    ), seen AS (
        SELECT user_id, max(seq) AS max_seq FROM input GROUP BY user_id
    ), state AS (
        INSERT INTO l3.user_state AS s (user_id, n_rows, max_seq)
        SELECT seen.user_id, coalesce(added.n, 0), seen.max_seq
        FROM seen LEFT JOIN added USING (user_id)
        ON CONFLICT (user_id) DO UPDATE
           SET n_rows  = s.n_rows + excluded.n_rows,
               max_seq = greatest(s.max_seq, excluded.max_seq)
    )
    SELECT coalesce(sum(n), 0) INTO inserted FROM added;

    IF p_watermark IS NOT NULL THEN
        INSERT INTO l3.progress AS p (name, applied_seq) VALUES ('log', p_watermark)
        ON CONFLICT (name) DO UPDATE SET applied_seq = greatest(p.applied_seq, excluded.applied_seq);
    END IF;
    RETURN inserted;
END
$$;

CREATE FUNCTION l3.forget(p_user_id text, p_upto_seq bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    deleted bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(1815309685, hashtext(p_user_id));

    INSERT INTO l3.forgotten AS f (user_id, upto_seq) VALUES (p_user_id, p_upto_seq)
    ON CONFLICT (user_id) DO UPDATE
       SET upto_seq = greatest(f.upto_seq, excluded.upto_seq), forgotten_at = now();

    DELETE FROM l3.messages WHERE user_id = p_user_id AND seq <= p_upto_seq;
    GET DIAGNOSTICS deleted = ROW_COUNT;

    UPDATE l3.user_state SET n_rows = greatest(n_rows - deleted, 0) WHERE user_id = p_user_id;
    RETURN deleted;
END
$$;
