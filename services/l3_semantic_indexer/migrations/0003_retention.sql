-- Retention (shared.retention): the sweeper deletes the rows the log dropped,
-- by age (every seq below the first message stored within the age limit) and
-- by count (beyond a user's newest N).

-- age: the oldest rows of every user, a range of this index per batch
CREATE INDEX messages_seq ON l3.messages (seq);

-- Delete the given rows (a batch the sweeper picked) and keep user_state.n_rows
-- in step; returns how many were deleted. Takes the users' advisory locks in
-- sorted order first, as upsert_messages and forget do, so it neither
-- deadlocks with them nor interleaves with a batch of the same user.
CREATE FUNCTION l3.retire(p_user_id text[], p_msg_id text[]) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    u text;
    deleted bigint;
BEGIN
    FOR u IN SELECT DISTINCT x FROM unnest(p_user_id) AS x ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(1815309685, hashtext(u));
    END LOOP;

    WITH del AS (
        DELETE FROM l3.messages m
        USING unnest(p_user_id, p_msg_id) AS d(user_id, msg_id)
        WHERE m.user_id = d.user_id AND m.msg_id = d.msg_id
        RETURNING m.user_id
    ), counted AS (
        SELECT user_id, count(*) AS n FROM del GROUP BY user_id
    ), fixed AS (
        UPDATE l3.user_state s SET n_rows = greatest(s.n_rows - c.n, 0)
        FROM counted c WHERE s.user_id = c.user_id
    )
    SELECT coalesce(sum(n), 0) INTO deleted FROM counted;
    RETURN deleted;
END
$$;
