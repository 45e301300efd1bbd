-- The namespace (tenant) of each entry, so an operator can flush one
-- (`llm.admin.flush`); the partition hash alone cannot say which rows are whose.
-- Rows stored before this read as '' (no namespace).
ALTER TABLE llm.entries ADD COLUMN IF NOT EXISTS namespace text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS entries_namespace ON llm.entries (namespace) WHERE namespace <> '';
