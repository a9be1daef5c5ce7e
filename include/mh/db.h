/*
 * db.h — asynchronous PostgreSQL on the loop: non-blocking libpq
 * connections watched by uv_poll_t, a pool, prepared statements, pipeline
 * mode, transactions on a held connection, COPY FROM STDIN, reconnect
 * after a dropped connection, a per-query timeout, the migrations runner.
 * Implemented in src/db/ (pool.c, conn.c, copy.c, migrate.c).
 *
 * Invariants:
 *  - Nothing here blocks the loop (PQconnectStart/PQconnectPoll,
 *    PQsendQueryParams/PQsendQueryPrepared, PQconsumeInput, PQflush),
 *    except mh_db_migrate (start-up only) and libpq's host name lookup
 *    when a connection starts (use an address or a socket path).
 *  - Callbacks fire on a later loop turn, exactly once per operation,
 *    never from inside the call that started it (even for an error known
 *    at once). Inputs (SQL, parameters, COPY data) are copied before the
 *    call returns.
 *  - A PGresult handed to a callback is owned by the db module and is
 *    cleared right after the callback returns: copy what you need.
 *    Results are in text format (binary for statements that ask,
 *    mh_stmt_t.result_format).
 *  - Errors are translated in one place: SQLSTATE 23505 (unique_violation),
 *    40001 (serialization_failure) and 40P01 (deadlock_detected) ->
 *    MH_ECONFLICT; 57014 (query_canceled, e.g. statement_timeout) ->
 *    MH_ETIMEDOUT; connection loss (class 08, 57P01-03, a dead socket) ->
 *    MH_EDBDOWN; anything else -> MH_EDB. errmsg is the server's primary
 *    message, one line (valid during the callback; NULL on success).
 *  - A query in flight on a connection that drops fails with MH_EDBDOWN;
 *    it is never retried here (it may not be idempotent): the caller
 *    decides. The pool reconnects in the background (backoff 100 ms ..
 *    5 s).
 *  - Per-query timeout: server side via statement_timeout (set at connect
 *    time from query_timeout_ms), and a client-side timer at timeout + 2 s
 *    that declares the connection dead (closed, then reconnected; the
 *    callback gets MH_ETIMEDOUT) so no caller hangs. A held connection
 *    that SETs a longer statement_timeout is still cut at timeout + 2 s.
 *  - Every session has application_name=musehubd and jit=off: the
 *    planner's JIT decision follows its cost estimates, which for a bulk
 *    push's statements (or a branch of one that never runs) pass the
 *    inlining threshold and cost 100+ ms of LLVM compilation for a
 *    statement that runs in a few ms (docs/benchmarks.md, issue 20). The
 *    URL's own options (or PGOPTIONS) come after ours and may turn it on.
 */
#ifndef MH_DB_H
#define MH_DB_H

#include <libpq-fe.h>
#include <uv.h>

#include "mh/core.h"

typedef struct mh_db mh_db_t;         /* the pool */
typedef struct mh_dbconn mh_dbconn_t; /* one connection, held or pooled */

typedef struct {
    const char *url;          /* libpq conninfo "k=v ..." or URI (MUSEHUB_DATABASE_URL) */
    uint32_t pool_size;       /* connections (MUSEHUB_DB_POOL), 0 = 8, at most 1000 */
    uint32_t query_timeout_ms;/* statement_timeout, 0 = 30000; also how long a waiter waits */
    uint32_t max_waiters;     /* queue bound, 0 = 4096; past it -> MH_EDBDOWN */
} mh_db_config_t;

/* A prepared statement: define them as static const objects (the pool
 * keeps pointers to name/sql for its lifetime); the pool prepares each
 * lazily once per connection, by `name` (at most 63 bytes, unique in the
 * process), in the same round trip as its first execution there. */
typedef struct {
    const char *name; /* unique, e.g. "repo_by_slug" */
    const char *sql;  /* with $1..$n */
    int nparams;
    /* 0 (the default): results in text format. 1: every column in
     * binary format — bytea arrives as its bytes rather than twice as many
     * hex digits (large deltas); cast other columns to text in the SQL
     * (the binary form of text is the text itself, NUL-terminated by
     * libpq), so mh_pq_str / mh_pq_int / mh_pq_bytea read them as usual. */
    int result_format;
} mh_stmt_t;

/* Result callback. res is NULL when err != 0. */
typedef void (*mh_db_result_cb)(void *ud, PGresult *res, int err, const char *errmsg);
/* Acquire callback: c is NULL when err != 0. */
typedef void (*mh_db_conn_cb)(void *ud, mh_dbconn_t *c, int err);

/* Creates the pool and starts connecting pool_size connections in the
 * background (a database that is down is not an error here: queries wait
 * for it up to query_timeout_ms). Returns 0, MH_EINVAL (no url, a url
 * libpq cannot parse, pool_size > 1000, query_timeout_ms > 2^31-1) or
 * MH_ENOMEM. *out is freed by mh_db_close. SPEC 6 (MUSEHUB_DATABASE_URL,
 * MUSEHUB_DB_POOL). */
int mh_db_open(uv_loop_t *loop, const mh_db_config_t *cfg, mh_db_t **out);

/* Closes the pool: waiters fail with MH_ECANCELED, queries in flight
 * finish, held connections close when released; then done(arg) (may be
 * NULL) on a later loop turn, after which db is freed. Calls after close
 * fail with MH_ECANCELED. */
void mh_db_close(mh_db_t *db, void (*done)(void *arg), void *arg);

/* Pool statistics for /metrics (a snapshot; counters since open). */
typedef struct {
    uint32_t size, connected, idle, held, waiters;
    uint64_t queries, errors, reconnects; /* ops started, ops failed, sessions re-established */
} mh_db_stats_t;
void mh_db_stats(mh_db_t *db, mh_db_stats_t *st);

/* Appends Prometheus text (# HELP/# TYPE and one sample each):
 * musehub_db_pool_{size,connected,idle,held,waiters} gauges and
 * musehub_db_{queries,errors,reconnects}_total counters (SPEC 4.8).
 * Returns 0 or MH_ENOMEM. */
int mh_db_metrics_write(mh_db_t *db, mh_buf_t *out);

/* ------------------------------------------------------ one-shot queries */

/* Runs one parameterised statement (a single statement: the extended
 * protocol refuses several) on any free connection, queued FIFO when
 * none is free; each one-shot query is its own implicit transaction.
 * vals are text-format parameters (NUL-terminated; NULL = SQL NULL); lens
 * may be NULL unless a parameter is binary; fmts may be NULL (all text)
 * or 1 for binary (bytea: lens[i] bytes). Under load, queued one-shot
 * queries are sent to a connection in batches (one pipeline, one Sync
 * each: still independent transactions). Errors: MH_EINVAL (bad
 * arguments), MH_EDBDOWN (queue full, no connection within the timeout,
 * connection lost), MH_ECANCELED (pool closing) and the translations
 * above. */
void mh_db_query(mh_db_t *db, const char *sql, int nparams, const char *const *vals, const int *lens,
                 const int *fmts, mh_db_result_cb cb, void *ud);

/* As mh_db_query with a prepared statement (st->nparams values). */
void mh_db_exec(mh_db_t *db, const mh_stmt_t *st, const char *const *vals, const int *lens,
                const int *fmts, mh_db_result_cb cb, void *ud);

/* --------------------------------------------------- held connections */

/* Takes a connection out of the pool (waits in the same FIFO queue as
 * one-shot queries). err: MH_EDBDOWN when the queue is full or no
 * connection could be had within query_timeout_ms; MH_ECANCELED when the
 * pool closes. The caller must mh_dbconn_release it. */
void mh_db_acquire(mh_db_t *db, mh_db_conn_cb cb, void *ud);

/* Returns the connection (may be called from its callbacks). If it is
 * inside a transaction (an error left it there, or the caller forgot) a
 * ROLLBACK is sent first, with DISCARD TEMP in the same round trip: a
 * rolled-back transaction's rows in the session's temporary tables would
 * stay on disk until a later COMMIT (mh/refwrite.h). Released while a
 * query is in flight: the query still reports, then the connection
 * returns. Session settings made with a plain SET stay with the session:
 * use SET LOCAL inside a transaction. */
void mh_dbconn_release(mh_dbconn_t *c);

/* Queries on a held connection, one at a time (a second one while the
 * first is in flight fails with MH_EINVAL). If the session was lost
 * while held, every query fails with MH_EDBDOWN until release: a
 * transaction never silently continues on a new session. */
void mh_dbconn_query(mh_dbconn_t *c, const char *sql, int nparams, const char *const *vals,
                     const int *lens, const int *fmts, mh_db_result_cb cb, void *ud);
void mh_dbconn_exec(mh_dbconn_t *c, const mh_stmt_t *st, const char *const *vals, const int *lens,
                    const int *fmts, mh_db_result_cb cb, void *ud);

/* Runs a parameterless multi-statement script ("BEGIN; ...") with the
 * simple query protocol; the callback gets the last statement's result,
 * or the first error (statements after it do not run). A COPY FROM STDIN
 * inside is refused (MH_EDB); COPY TO STDOUT is not supported. */
void mh_dbconn_script(mh_dbconn_t *c, const char *sql, mh_db_result_cb cb, void *ud);

/* COPY ... FROM STDIN: sends `copy_sql`, streams data[0..n) (COPY text
 * format rows, already escaped with mh_copy_*, or mh_copyb_* binary rows
 * with a FORMAT binary copy_sql), ends the copy. The data is borrowed,
 * not copied: the caller keeps it valid and unchanged until the callback
 * (a push's snapshot rows can be hundreds of MiB). copy_sql is copied.
 * The callback gets the command result (PQcmdTuples = rows); bad data ->
 * MH_EDB with the server's message, the session stays usable. */
void mh_dbconn_copy_in(mh_dbconn_t *c, const char *copy_sql, const void *data, size_t n,
                       mh_db_result_cb cb, void *ud);

/* Pipeline mode: sends n queries back to back with one Sync and calls cb
 * once with all n results in order. results[i] is NULL for the query that
 * failed and every one after it (they were not run); err/errmsg are the
 * first error. The queries run as ONE implicit transaction (unless they
 * hold their own BEGIN/COMMIT): an error rolls back the earlier ones too.
 * PGresults are cleared after cb returns. */
typedef struct {
    const mh_stmt_t *stmt; /* or NULL to use sql */
    const char *sql;
    int nparams; /* ignored with stmt (stmt->nparams) */
    const char *const *vals;
    const int *lens;
    const int *fmts;
} mh_db_pq_t;
typedef void (*mh_db_pipeline_cb)(void *ud, PGresult **results, int n, int err, const char *errmsg);
void mh_dbconn_pipeline(mh_dbconn_t *c, const mh_db_pq_t *qs, int n, mh_db_pipeline_cb cb, void *ud);
void mh_db_pipeline(mh_db_t *db, const mh_db_pq_t *qs, int n, mh_db_pipeline_cb cb, void *ud);

/* A pipeline put together in a local variable: statements and their
 * parameters (borrowed strings; the pipeline call copies everything, so
 * the batch may go out of scope right after it). Adding past the bounds
 * marks the batch full (a programming error; the call then fails with
 * MH_EINVAL): size batches for their longest use. */
#define MH_DB_BATCH_MAX 16
#define MH_DB_BATCH_VALS 64
typedef struct {
    mh_db_pq_t q[MH_DB_BATCH_MAX];
    const char *v[MH_DB_BATCH_VALS];
    int lens[MH_DB_BATCH_VALS], fmts[MH_DB_BATCH_VALS];
    int n, nv;
    bool full;
} mh_db_batch_t;

/* Appends one statement with n text parameters (const char *, NULL for
 * SQL NULL); returns its index in the batch, -1 when full. */
int mh_db_batch_add(mh_db_batch_t *b, const char *sql, int n, ...);
/* As mh_db_batch_add with a prepared statement (st->nparams parameters). */
int mh_db_batch_stmt(mh_db_batch_t *b, const mh_stmt_t *st, ...);
/* Makes parameter k (0-based) of the last statement a binary one of len
 * bytes at p (bytea); p NULL is SQL NULL. */
void mh_db_batch_bin(mh_db_batch_t *b, int k, const void *p, size_t len);

/* LISTEN on a channel (case-sensitive, at most 63 bytes; NOTIFY it with
 * pg_notify('name', payload)) on a dedicated connection; cb(ud, channel,
 * payload) for every notification, called from the loop. After a dropped
 * connection it reconnects and LISTENs again; notifications sent while
 * it was down are lost, so treat them as hints and re-read state. Returns
 * 0, MH_EINVAL, MH_ENOMEM or MH_ECANCELED (pool closing). */
int mh_db_listen(mh_db_t *db, const char *channel, void (*cb)(void *ud, const char *channel,
                 const char *payload), void *ud);

/* ------------------------------------------------------- COPY helpers */

/* Appends a COPY text-format field (escaping \ tab newline CR as \\ \t
 * \n \r) and then the separator: '\t' when !last, '\n' when last. NULL p
 * writes \N. Returns 0 or MH_ENOMEM. */
int mh_copy_field(mh_buf_t *b, const char *p, size_t n, bool last);
/* bytea field in hex form: the bytes "\\x<hex>" (the doubled backslash is
 * COPY's escape of bytea's "\x" prefix), then the separator. */
int mh_copy_bytea(mh_buf_t *b, const void *p, size_t n, bool last);
/* Decimal integer field, then the separator. */
int mh_copy_int(mh_buf_t *b, int64_t v, bool last);

/* COPY binary format (PostgreSQL docs, "COPY: Binary Format"), for
 * "COPY t FROM STDIN (FORMAT binary)": values are sent as they are stored
 * (bytea as raw bytes, not hex: half the bytes, no decoding on the
 * server). A buffer is: the header, then rows, then the trailer.
 * mh_copyb_row starts a row of nfields fields (writing the header first
 * when b is empty); each field follows with mh_copyb_field (text or bytea
 * bytes; NULL p is SQL NULL; n below 2^31), mh_copyb_int4 (an int column)
 * or mh_copyb_open / mh_copyb_close around bytes appended to b in place
 * (open returns the field's start, close writes its length: no copy of a
 * large value); mh_copyb_end writes the trailer (and the header of a
 * buffer without rows). Returns 0, MH_ENOMEM, or MH_EINVAL (a field of
 * 2^31 bytes or more). */
int mh_copyb_row(mh_buf_t *b, uint16_t nfields);
int mh_copyb_field(mh_buf_t *b, const void *p, size_t n);
int mh_copyb_int4(mh_buf_t *b, int32_t v);
int mh_copyb_open(mh_buf_t *b, size_t *at);
int mh_copyb_close(mh_buf_t *b, size_t at);
int mh_copyb_end(mh_buf_t *b);

/* ------------------------------------------------------------ helpers */

/* Value of row r, column c as a NUL-terminated string (never NULL: ""
 * for SQL NULL) and whether it is NULL. Valid while res is. */
const char *mh_pq_str(const PGresult *res, int r, int c);
bool mh_pq_isnull(const PGresult *res, int r, int c);
/* Integer value (strtoll); 0 for SQL NULL. */
int64_t mh_pq_int(const PGresult *res, int r, int c);
/* Decodes a bytea column (text format "\x<hex>", or the escape format, or
 * a binary-format column) into the arena: *out holds *n bytes. Returns 0,
 * MH_EPARSE (bad hex) or MH_ENOMEM. */
int mh_pq_bytea(mh_arena_t *a, const PGresult *res, int r, int c, uint8_t **out, size_t *n);

/* A text[] literal "{a,b,...}" of n items, to pass as one parameter
 * ($1::text[]) instead of n parameters or SQL built around the values.
 * Each item is len bytes long, or NUL-terminated when len is 0; items
 * that need it (empty, NULL, whitespace or any of {}",\) are quoted and
 * escaped, so any text round-trips; ids need none. NUL-terminated, in
 * arena a; NULL on ENOMEM. The one array builder. */
char *mh_pq_array(mh_arena_t *a, const char *const *items, size_t n, size_t len);

/* ---------------------------------------------------------- migrations */

/* One migration: `name` (e.g. "0001_init", recorded in schema_migrations)
 * and its SQL (several statements allowed; no BEGIN/COMMIT inside, and
 * nothing that cannot run in a transaction block such as CREATE INDEX
 * CONCURRENTLY). */
typedef struct {
    const char *name;
    const char *sql;
} mh_migration_t;

/* The project's migrations, generated from sql/NNNN_*.sql at build time
 * (scripts/embed-sql.sh), in file-name order. */
extern const mh_migration_t mh_migrations[];
extern const size_t mh_migrations_count;

/* Applies migs[0..n) in order, skipping those already recorded in table
 * schema_migrations(name text primary key, applied_at timestamptz), which
 * it creates if absent. Each migration runs in its own transaction with
 * its record; a session advisory lock serialises concurrent starters, so
 * each migration is applied exactly once. Blocking (synchronous libpq):
 * used only at start-up before the loop runs, and by `musehubd migrate`
 * (SPEC 6). Logs each applied migration. Returns 0, MH_EINVAL (NULL
 * name/sql), MH_EDBDOWN (cannot connect) or MH_EDB (a migration failed:
 * the server's message is logged; earlier ones stay applied). */
int mh_db_migrate(const char *url, const mh_migration_t *migs, size_t n);

#endif
