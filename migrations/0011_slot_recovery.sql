-- The last automatic recovery of a lost replication slot
-- (cdc.on_slot_lost = "recreate"): when, and why the slot was lost.
-- `pgoutbox status` shows it. See docs/high-availability.md.
ALTER TABLE {{schema}}.pgoutbox_slot_state
  ADD COLUMN IF NOT EXISTS recovered_at timestamptz,
  ADD COLUMN IF NOT EXISTS lost_reason  text;
