-- Poll mode: the reaper's index over leased rows, and the function behind the
-- optional wake-up trigger (the trigger itself is created or dropped by
-- `pgoutbox migrate` from the config's poll.notify, see src/poll/schema.rs).
CREATE INDEX IF NOT EXISTS {{processing_index}}
  ON {{schema}}.{{table}} (locked_until) WHERE status = 'PROCESSING';

-- Dead-lettered rows, for `pgoutbox dle` and the dead-letter count metric.
CREATE INDEX IF NOT EXISTS {{dead_letter_index}}
  ON {{schema}}.{{table}} (created_at, id) WHERE status = 'DEAD_LETTER';

-- Statement-level AFTER INSERT trigger function: one notification per
-- inserting statement on the channel given as the trigger's argument.
CREATE OR REPLACE FUNCTION {{schema}}.pgoutbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  PERFORM pg_notify(TG_ARGV[0], '');
  RETURN NULL;
END
$fn$;
