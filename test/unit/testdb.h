/*
 * testdb.h — helpers for the unit tests that need a real PostgreSQL
 * (MUSEHUB_TEST_DATABASE_URL, started by scripts/unit-run.py): each test
 * program works in a database of its own, created and dropped here.
 */
#ifndef MH_TESTDB_H
#define MH_TESTDB_H

#include <libpq-fe.h>
#include <stdio.h>
#include <string.h>

#include "mh/core.h"

static void testdb_quiet(void *arg, const char *msg)
{
    (void)arg;
    (void)msg;
}

/* The connection string `url` with its database replaced by dbname, as a
 * keyword/value string (heap; the caller frees it). NULL on a bad url. */
static char *testdb_url(const char *url, const char *dbname)
{
    PQconninfoOption *opts = PQconninfoParse(url, NULL);
    if (!opts) return NULL;
    mh_buf_t b = {0};
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        const char *v = !strcmp(o->keyword, "dbname") ? dbname : o->val;
        if (!v || !*v) continue;
        mh_buf_printf(&b, "%s='", o->keyword);
        for (const char *p = v; *p; p++) {
            if (*p == '\'' || *p == '\\') mh_buf_append_byte(&b, '\\');
            mh_buf_append_byte(&b, (uint8_t)*p);
        }
        mh_buf_append_str(&b, "' ");
    }
    if (!strstr((char *)b.p, "dbname=")) mh_buf_printf(&b, "dbname='%s' ", dbname);
    mh_buf_append_byte(&b, 0);
    PQconninfoFree(opts);
    return (char *)b.p;
}

/* Runs one utility statement (CREATE/DROP DATABASE) on its own
 * connection; a failure is printed as a TAP comment. */
static void testdb_admin(const char *url, const char *sql)
{
    PGconn *c = PQconnectdb(url);
    PQsetNoticeProcessor(c, testdb_quiet, NULL);
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) printf("# %s: %s", sql, PQerrorMessage(c));
    PQclear(r);
    PQfinish(c);
}

#endif
