-- 0006_repo_notify: every change to a repository row or its
-- collaborators NOTIFYs channel musehub_repo with the repository id, so
-- each process drops its cached lookup of that repository (repo_cache.c)
-- when the change commits (NOTIFY is transactional).
CREATE FUNCTION musehub_repo_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('musehub_repo', OLD.repo_id);
    ELSE
        PERFORM pg_notify('musehub_repo', NEW.repo_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER repos_notify AFTER UPDATE OR DELETE ON repos
    FOR EACH ROW EXECUTE FUNCTION musehub_repo_notify();
CREATE TRIGGER collaborators_notify AFTER INSERT OR UPDATE OR DELETE ON collaborators
    FOR EACH ROW EXECUTE FUNCTION musehub_repo_notify();
