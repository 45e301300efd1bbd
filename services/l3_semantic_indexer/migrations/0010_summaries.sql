-- Rolling summaries for context assembly (memory.get op "context").
--
-- A summary stands for a user's messages from_seq..upto_seq. Each one extends
-- the previous by a block of messages (services/l3_semantic_indexer/
-- summaries.py), so they form a chain per user; a read takes the newest.
-- They are derived from messages, so forgetting the messages forgets them:
-- l3.forget deletes every summary that covers a forgotten seq, and
-- l3.put_summary refuses one that does (a summary computed while the forget
-- ran must not bring the text back).
CREATE TABLE l3.summaries (
    user_id    text        NOT NULL,
    upto_seq   bigint      NOT NULL,
    from_seq   bigint      NOT NULL,
    text       text        NOT NULL,
    tokens     integer     NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, upto_seq)
);

CREATE OR REPLACE FUNCTION l3.forget(p_user_id text, p_upto_seq bigint) RETURNS bigint
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
    DELETE FROM l3.summaries WHERE user_id = p_user_id AND from_seq <= p_upto_seq;

    UPDATE l3.user_state SET n_rows = greatest(n_rows - deleted, 0) WHERE user_id = p_user_id;
    RETURN deleted;
END
$$;

-- Store a summary unless it covers a forgotten seq; true when stored now.
CREATE FUNCTION l3.put_summary(p_user_id text, p_from_seq bigint, p_upto_seq bigint,
                               p_text text, p_tokens integer) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stored integer;
BEGIN
    PERFORM pg_advisory_xact_lock(1815309685, hashtext(p_user_id));
    IF EXISTS (SELECT 1 FROM l3.forgotten WHERE user_id = p_user_id AND upto_seq >= p_from_seq) THEN
        RETURN false;
    END IF;
    INSERT INTO l3.summaries (user_id, upto_seq, from_seq, text, tokens)
    VALUES (p_user_id, p_upto_seq, p_from_seq, p_text, p_tokens)
    ON CONFLICT (user_id, upto_seq) DO NOTHING;
    GET DIAGNOSTICS stored = ROW_COUNT;
    RETURN stored > 0;
END
$$;
