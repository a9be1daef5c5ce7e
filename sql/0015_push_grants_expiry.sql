-- 0015_push_grants_expiry: the jobs maintenance pass removes abandoned
-- staged uploads (incoming/<id>) once their push grant has been expired
-- for the grace period, and then the grant row itself (src/jobs/sweep.c,
-- SPEC 4.3; docs/architecture.md "Abandoned staged uploads"). It asks for
-- the oldest expired grants first, a batch at a time: this index keeps
-- that a range scan however many grants accumulate.
CREATE INDEX push_grants_expires ON push_grants (expires_at);
