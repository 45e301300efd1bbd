-- The sweeper (ResponseCache.sweep) deletes expired rows oldest first.
CREATE INDEX IF NOT EXISTS entries_expires ON llm.entries (expires_at);
