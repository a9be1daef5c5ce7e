-- 0003_jobs: what the job runner (SPEC 4.7, src/jobs/) needs beyond 0001.
--
-- * Every insert into `jobs` wakes the runners: a NOTIFY on channel
--   musehub_jobs (payload: the job type) is sent at commit, whoever
--   inserted the row. Runners also poll, so a lost notification only
--   delays a job.
-- * Pruning finished jobs reads them by age.
-- * GC and the sweep ask "does any repository still reference this
--   pack?" (mpack_refs by mpack_id; its primary key leads with repo_id),
--   and the sweep lists superseded packs by age.

CREATE FUNCTION musehub_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('musehub_jobs', NEW.job_type);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION musehub_jobs_notify();

CREATE INDEX jobs_finished ON jobs (updated_at) WHERE status IN ('done', 'failed');
CREATE INDEX jobs_repo ON jobs (repo_id);
CREATE INDEX mpack_refs_mpack ON mpack_refs (mpack_id);
CREATE INDEX mpacks_superseded ON mpacks (superseded_at) WHERE superseded_at IS NOT NULL;
