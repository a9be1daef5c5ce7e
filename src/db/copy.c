/*
 * copy.c — COPY text-format writers (mh_copy_*), binary-format writers
 * (mh_copyb_*) and PGresult readers (mh_pq_*). Pure functions, no I/O.
 *
 * COPY text format (PostgreSQL docs, "COPY: Text Format"): fields are
 * separated by a tab, rows end with a newline, \N is NULL, and a
 * backslash, tab, newline or carriage return inside a value must be
 * written as \\ \t \n \r. Every backslash in the data is doubled, so no
 * value can ever produce the end-of-data marker "\." on its own line.
 */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "mh/db.h"

int mh_copy_field(mh_buf_t *b, const char *p, size_t n, bool last)
{
    if (!p) {
        int rc = mh_buf_reserve(b, 3);
        if (rc) return rc;
        memcpy(b->p + b->len, last ? "\\N\n" : "\\N\t", 3);
        b->len += 3;
        return 0;
    }
    if (n > (SIZE_MAX - 1) / 2) return MH_ENOMEM;
    /* Worst case every byte doubles: one reservation, one pass. */
    int rc = mh_buf_reserve(b, 2 * n + 1);
    if (rc) return rc;
    uint8_t *o = b->p + b->len;
    for (size_t i = 0; i < n; i++) {
        uint8_t ch = (uint8_t)p[i];
        switch (ch) {
        case '\\': *o++ = '\\', *o++ = '\\'; break;
        case '\t': *o++ = '\\', *o++ = 't'; break;
        case '\n': *o++ = '\\', *o++ = 'n'; break;
        case '\r': *o++ = '\\', *o++ = 'r'; break;
        default: *o++ = ch; break;
        }
    }
    *o++ = last ? '\n' : '\t';
    b->len = (size_t)(o - b->p);
    return 0;
}

int mh_copy_bytea(mh_buf_t *b, const void *p, size_t n, bool last)
{
    if (!p && n) return MH_EINVAL;
    if (n > (SIZE_MAX - 4) / 2) return MH_ENOMEM;
    /* "\\x" + hex + sep: the doubled backslash is COPY's escaping of the
     * "\x" prefix of bytea's hex input format. */
    int rc = mh_buf_reserve(b, 2 * n + 4);
    if (rc) return rc;
    char *o = (char *)b->p + b->len;
    memcpy(o, "\\\\x", 3);
    mh_hex_encode(o + 3, p, n); /* writes a NUL, overwritten below */
    o[3 + 2 * n] = last ? '\n' : '\t';
    b->len += 2 * n + 4;
    return 0;
}

int mh_copy_int(mh_buf_t *b, int64_t v, bool last)
{
    char tmp[24];
    char *e = tmp + sizeof tmp, *s = e;
    *--s = last ? '\n' : '\t';
    /* Negate in unsigned arithmetic so INT64_MIN works. */
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        *--s = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) *--s = '-';
    return mh_buf_append(b, s, (size_t)(e - s));
}

/* ------------------------------------------------------ binary format */

/* "PGCOPY\n\377\r\n\0", then flags and the header extension's length
 * (both 0). */
static const uint8_t copyb_header[19] = {'P', 'G', 'C', 'O', 'P', 'Y', '\n', 0xff, '\r', '\n',
                                         0,   0,   0,   0,   0,   0,   0,    0,    0};

static void put_be(uint8_t *o, uint32_t v, int n)
{
    for (int i = n - 1; i >= 0; i--, v >>= 8) o[i] = (uint8_t)v;
}

static int put_word(mh_buf_t *b, uint32_t v, int n)
{
    int rc = mh_buf_reserve(b, (size_t)n);
    if (rc) return rc;
    put_be(b->p + b->len, v, n);
    b->len += (size_t)n;
    return 0;
}

/* The header, when b is still empty. */
static int header_once(mh_buf_t *b) { return b->len ? 0 : mh_buf_append(b, copyb_header, sizeof copyb_header); }

int mh_copyb_row(mh_buf_t *b, uint16_t nfields)
{
    int rc = header_once(b);
    return rc ? rc : put_word(b, nfields, 2);
}

int mh_copyb_field(mh_buf_t *b, const void *p, size_t n)
{
    if (!p) return put_word(b, UINT32_MAX, 4); /* -1: NULL */
    if (n > INT32_MAX) return MH_EINVAL;
    int rc = mh_buf_reserve(b, 4 + n);
    if (rc) return rc;
    put_be(b->p + b->len, (uint32_t)n, 4);
    if (n) memcpy(b->p + b->len + 4, p, n);
    b->len += 4 + n;
    return 0;
}

int mh_copyb_int4(mh_buf_t *b, int32_t v)
{
    int rc = put_word(b, 4, 4);
    return rc ? rc : put_word(b, (uint32_t)v, 4);
}

int mh_copyb_open(mh_buf_t *b, size_t *at)
{
    *at = b->len;
    return put_word(b, 0, 4);
}

int mh_copyb_close(mh_buf_t *b, size_t at)
{
    size_t n = b->len - at - 4;
    if (n > INT32_MAX) return MH_EINVAL;
    put_be(b->p + at, (uint32_t)n, 4);
    return 0;
}

int mh_copyb_end(mh_buf_t *b)
{
    int rc = header_once(b);
    return rc ? rc : put_word(b, 0xffff, 2); /* a field count of -1 */
}

/* ------------------------------------------------------------ readers */

const char *mh_pq_str(const PGresult *res, int r, int c) { return PQgetvalue(res, r, c); }

bool mh_pq_isnull(const PGresult *res, int r, int c) { return PQgetisnull(res, r, c) != 0; }

int64_t mh_pq_int(const PGresult *res, int r, int c)
{
    if (PQgetisnull(res, r, c)) return 0;
    return strtoll(PQgetvalue(res, r, c), NULL, 10);
}

int mh_pq_bytea(mh_arena_t *a, const PGresult *res, int r, int c, uint8_t **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    const char *v = PQgetvalue(res, r, c);
    size_t len = (size_t)PQgetlength(res, r, c);
    if (PQfformat(res, c) == 1) { /* binary result column: raw bytes */
        uint8_t *d = mh_alloc(a, len + 1);
        if (!d) return MH_ENOMEM;
        memcpy(d, v, len);
        *out = d;
        *n = len;
        return 0;
    }
    if (len >= 2 && v[0] == '\\' && v[1] == 'x') { /* hex: bytea_output's default */
        if ((len - 2) % 2) return MH_EPARSE;
        size_t m = (len - 2) / 2;
        uint8_t *d = mh_alloc(a, m + 1);
        if (!d) return MH_ENOMEM;
        int rc = mh_hex_decode(d, v + 2, m);
        if (rc) return rc;
        *out = d;
        *n = m;
        return 0;
    }
    /* bytea_output = escape (a server configured so): let libpq decode. */
    size_t m = 0;
    unsigned char *u = PQunescapeBytea((const unsigned char *)v, &m);
    if (!u) return MH_ENOMEM;
    uint8_t *d = mh_alloc(a, m + 1);
    if (d) memcpy(d, u, m);
    PQfreemem(u);
    if (!d) return MH_ENOMEM;
    *out = d;
    *n = m;
    return 0;
}

/* ------------------------------------------------------------ arrays */

static bool needs_quotes(const char *p, size_t n)
{
    if (n == 0 || (n == 4 && strncasecmp(p, "null", 4) == 0)) return true;
    for (size_t i = 0; i < n; i++)
        if (strchr("{}\",\\ \t\n\r\v\f", p[i]) && p[i]) return true;
    return false;
}

char *mh_pq_array(mh_arena_t *a, const char *const *items, size_t n, size_t len)
{
    size_t total = 3;
    for (size_t i = 0; i < n; i++) total += 2 * (len ? len : strlen(items[i])) + 3;
    char *s = mh_alloc(a, total), *o = s;
    if (!s) return NULL;
    *o++ = '{';
    for (size_t i = 0; i < n; i++) {
        size_t m = len ? len : strlen(items[i]);
        const char *p = items[i];
        if (i) *o++ = ',';
        if (!needs_quotes(p, m)) {
            memcpy(o, p, m);
            o += m;
            continue;
        }
        *o++ = '"';
        for (size_t k = 0; k < m; k++) {
            if (p[k] == '"' || p[k] == '\\') *o++ = '\\';
            *o++ = p[k];
        }
        *o++ = '"';
    }
    *o++ = '}';
    *o = 0;
    return s;
}

/* ------------------------------------------------------------ batches */

static int batch_add(mh_db_batch_t *b, const mh_stmt_t *st, const char *sql, int n, va_list ap)
{
    if (b->full || b->n == MH_DB_BATCH_MAX || b->nv + n > MH_DB_BATCH_VALS) {
        b->full = true;
        return -1;
    }
    for (int i = 0; i < n; i++) {
        b->v[b->nv + i] = va_arg(ap, const char *);
        b->lens[b->nv + i] = 0;
        b->fmts[b->nv + i] = 0;
    }
    b->q[b->n] = (mh_db_pq_t){st, sql, n, b->v + b->nv, b->lens + b->nv, b->fmts + b->nv};
    b->nv += n;
    return b->n++;
}

int mh_db_batch_add(mh_db_batch_t *b, const char *sql, int n, ...)
{
    va_list ap;
    va_start(ap, n);
    int i = batch_add(b, NULL, sql, n, ap);
    va_end(ap);
    return i;
}

int mh_db_batch_stmt(mh_db_batch_t *b, const mh_stmt_t *st, ...)
{
    va_list ap;
    va_start(ap, st);
    int i = batch_add(b, st, NULL, st->nparams, ap);
    va_end(ap);
    return i;
}

void mh_db_batch_bin(mh_db_batch_t *b, int k, const void *p, size_t len)
{
    if (b->full || !b->n || k >= b->q[b->n - 1].nparams) {
        b->full = true;
        return;
    }
    int j = (int)(b->q[b->n - 1].vals - b->v) + k;
    b->v[j] = p;
    b->lens[j] = (int)len;
    b->fmts[j] = 1;
}
