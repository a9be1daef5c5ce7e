/*
 * migrate.c — applies the embedded migrations (sql/NNNN_*.sql turned into
 * an mh_migration_t array at build time) with synchronous libpq. Runs
 * only before the loop starts (`musehubd serve`, `musehubd migrate`).
 *
 * Invariants:
 *  - A session-level advisory lock (key MIGRATE_LOCK) is held for the
 *    whole run, so processes starting together apply each migration
 *    exactly once: the second waits, then finds everything recorded.
 *    The lock dies with the session if the process does.
 *  - Each migration and its schema_migrations row commit together (one
 *    transaction): a failed migration leaves no trace and is retried on
 *    the next start.
 */
#include <stdio.h>
#include <string.h>

#include "mh/db.h"

/* "musehub\x01" as a big-endian int8: pg_advisory_lock's key space is
 * shared by every client of the database, so a distinctive key. */
#define MIGRATE_LOCK "7887337201790706177"

static void notice_cb(void *arg, const char *message)
{
    (void)arg;
    size_t n = strlen(message);
    while (n && message[n - 1] == '\n') n--;
    mh_debug("db: migrate notice: %.*s", (int)n, message);
}

/* Runs sql (simple protocol, may hold several statements); 0 or MH_EDB
 * with the server's message logged under `what`. */
static int run(PGconn *pg, const char *sql, const char *what)
{
    PGresult *r = PQexec(pg, sql);
    ExecStatusType st = PQresultStatus(r);
    int rc = 0;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_EMPTY_QUERY) {
        const char *m = r ? PQresultErrorMessage(r) : PQerrorMessage(pg);
        size_t n = strlen(m);
        while (n && m[n - 1] == '\n') n--;
        mh_error("migrate: %s failed: %.*s", what, (int)n, m);
        rc = PQstatus(pg) == CONNECTION_BAD ? MH_EDBDOWN : MH_EDB;
    }
    PQclear(r);
    return rc;
}

/* 1 when name is recorded, 0 when not, <0 on error. */
static int applied(PGconn *pg, const char *name)
{
    const char *vals[1] = {name};
    PGresult *r = PQexecParams(pg, "SELECT 1 FROM schema_migrations WHERE name = $1", 1, NULL, vals,
                               NULL, NULL, 0);
    int rc = PQresultStatus(r) == PGRES_TUPLES_OK ? PQntuples(r) > 0 : MH_EDB;
    if (rc < 0) mh_error("migrate: reading schema_migrations: %s", PQerrorMessage(pg));
    PQclear(r);
    return rc;
}

static int apply(PGconn *pg, const mh_migration_t *m)
{
    uint64_t t0 = mh_now_ms();
    int rc = run(pg, "BEGIN", "BEGIN");
    if (!rc) rc = run(pg, m->sql, m->name);
    if (!rc) {
        const char *vals[1] = {m->name};
        PGresult *r = PQexecParams(pg, "INSERT INTO schema_migrations (name) VALUES ($1)", 1, NULL,
                                   vals, NULL, NULL, 0);
        if (PQresultStatus(r) != PGRES_COMMAND_OK) {
            mh_error("migrate: recording %s: %s", m->name, PQerrorMessage(pg));
            rc = MH_EDB;
        }
        PQclear(r);
    }
    if (!rc) rc = run(pg, "COMMIT", "COMMIT");
    if (rc) {
        PQclear(PQexec(pg, "ROLLBACK"));
        return rc;
    }
    mh_info("migrate: applied %s in %llu ms", m->name, (unsigned long long)(mh_now_ms() - t0));
    return 0;
}

int mh_db_migrate(const char *url, const mh_migration_t *migs, size_t n)
{
    if (!url || (n && !migs)) return MH_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (!migs[i].name || !migs[i].sql) return MH_EINVAL;
    const char *keys[] = {"dbname", "application_name", NULL};
    const char *vals[] = {url, "musehubd", NULL};
    PGconn *pg = PQconnectdbParams(keys, vals, 1);
    if (!pg || PQstatus(pg) != CONNECTION_OK) {
        const char *m = pg ? PQerrorMessage(pg) : "out of memory";
        size_t len = strlen(m);
        while (len && m[len - 1] == '\n') len--;
        mh_error("migrate: cannot connect: %.*s", (int)len, m);
        PQfinish(pg);
        return MH_EDBDOWN;
    }
    PQsetNoticeProcessor(pg, notice_cb, NULL);
    /* Lock first: CREATE TABLE IF NOT EXISTS itself races between two
     * sessions (a unique violation on pg_type). */
    int rc = run(pg, "SELECT pg_advisory_lock(" MIGRATE_LOCK ")", "taking the migration lock");
    if (!rc)
        rc = run(pg,
                 "CREATE TABLE IF NOT EXISTS schema_migrations ("
                 " name text PRIMARY KEY,"
                 " applied_at timestamptz NOT NULL DEFAULT now())",
                 "creating schema_migrations");
    size_t done = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        int a = applied(pg, migs[i].name);
        if (a < 0) {
            rc = a;
        } else if (!a) {
            rc = apply(pg, &migs[i]);
            done += !rc;
        }
    }
    if (PQstatus(pg) == CONNECTION_OK)
        PQclear(PQexec(pg, "SELECT pg_advisory_unlock(" MIGRATE_LOCK ")"));
    PQfinish(pg);
    if (!rc) mh_info("migrate: %zu applied, %zu already there", done, n - done);
    return rc;
}
