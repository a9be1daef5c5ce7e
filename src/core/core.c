/*
 * core.c — errors, logging, arenas, buffers, hex/base64, hashing, clocks
 * (include/mh/core.h).
 *
 * Invariants: the arena never moves memory it has handed out (chunks are
 * only appended); cleanups run in reverse order of registration; bulk
 * SHA-256 goes through libcrypto (EVP), HMAC and base64 through mbedTLS.
 */
#include "mh/core.h"

#include <mbedtls/base64.h>
#include <mbedtls/md.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- errors */

const char *mh_strerror(int err)
{
    switch (err) {
    case MH_OK: return "success";
    case MH_EPARSE: return "malformed input";
    case MH_ELIMIT: return "input exceeds a configured limit";
    case MH_EHASH: return "content does not hash to its id";
    case MH_EDB: return "database error";
    case MH_ESTORE: return "object store error";
    case MH_ECONFLICT: return "conflict";
    case MH_EAUTH: return "authentication failed";
    case MH_EDBDOWN: return "database unavailable";
    case MH_ENOSPC: return "no space left in the object store";
    case MH_EBUDGET: return "the server's memory budget for pack work is spent; retry later";
    default: break;
    }
    if (err < 0 && err > -4096) return strerror(-err);
    return "unknown error";
}

/* --------------------------------------------------------------- logging */

mh_log_level_t mh_log_level_current = MH_LOG_INFO;
mh_log_format_t mh_log_format_current = MH_LOG_TEXT;

int mh_log_set_level(const char *name)
{
    static const char *names[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++)
        if (name && strcmp(name, names[i]) == 0) {
            mh_log_level_current = (mh_log_level_t)i;
            return 0;
        }
    return MH_EINVAL;
}

int mh_log_set_format(const char *name)
{
    if (name && !strcmp(name, "text")) mh_log_format_current = MH_LOG_TEXT;
    else if (name && !strcmp(name, "json")) mh_log_format_current = MH_LOG_JSON;
    else return MH_EINVAL;
    return 0;
}

/* A line being assembled in a fixed buffer; `cap` keeps room for the
 * closing bytes, so whatever is cut, the line still ends well. */
typedef struct {
    char *p;
    size_t len, cap, hard; /* content stops at cap; closing bytes may go up to hard */
} logline_t;

static void ll_put(logline_t *l, const char *s, size_t n)
{
    size_t room = l->len < l->cap ? l->cap - l->len : 0;
    if (n > room) n = room;
    memcpy(l->p + l->len, s, n);
    l->len += n;
}

/* A closing byte: written even past cap (hard keeps room for them). */
static void ll_close(logline_t *l, char c)
{
    if (l->len < l->hard) l->p[l->len++] = c;
}

static void ll_puts(logline_t *l, const char *s) { ll_put(l, s, strlen(s)); }

/* Length of the valid UTF-8 sequence at s[0..n) (RFC 3629: no overlong
 * forms, no surrogates, at most U+10FFFF), 0 when invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t k;
    unsigned min, cp;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) k = 2, min = 0x80, cp = c & 0x1f;
    else if (c >= 0xe0 && c <= 0xef) k = 3, min = 0x800, cp = c & 0x0f;
    else if (c >= 0xf0 && c <= 0xf4) k = 4, min = 0x10000, cp = c & 0x07;
    else return 0;
    if (n < k) return 0;
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return k;
}

/* A JSON string (with its quotes) of s[0..n). */
static void ll_json_str(logline_t *l, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    ll_put(l, "\"", 1);
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n && l->len + 8 < l->cap;) {
        unsigned char c = u[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            ll_put(l, e, 2);
            i++;
        } else if (c < 0x20 || c == 0x7f) {
            char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            if (c == '\n') ll_put(l, "\\n", 2);
            else if (c == '\t') ll_put(l, "\\t", 2);
            else if (c == '\r') ll_put(l, "\\r", 2);
            else ll_put(l, e, 6);
            i++;
        } else {
            size_t k = utf8_seq(u + i, n - i);
            if (k) ll_put(l, s + i, k);
            else ll_put(l, "\xef\xbf\xbd", 3); /* U+FFFD for a byte that is not UTF-8 */
            i += k ? k : 1;
        }
    }
    ll_close(l, '"');
}

static void log_emit(mh_log_level_t level, const mh_log_field_t *fields, size_t nf, const char *fmt, va_list ap)
{
    static const char *tags[] = {"DEBUG", "INFO", "WARN", "ERROR"};
    static const char *names[] = {"debug", "info", "warn", "error"};
    char msg[4096];
    int m = vsnprintf(msg, sizeof msg, fmt, ap);
    size_t mlen = m < 0 ? 0 : (size_t)m < sizeof msg ? (size_t)m : sizeof msg - 1;

    char ts[64];
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    snprintf(ts, sizeof ts, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
             tm.tm_hour, tm.tm_min, tm.tm_sec, now.tv_nsec / 1000000);

    char buf[16384];
    logline_t l = {buf, 0, sizeof buf - 64, sizeof buf}; /* room for closing quotes, "}\n" */
    char num[64];
    if (mh_log_format_current == MH_LOG_JSON) {
        ll_puts(&l, "{\"ts\":\"");
        ll_puts(&l, ts);
        ll_puts(&l, "\",\"level\":\"");
        ll_puts(&l, names[level & 3]);
        snprintf(num, sizeof num, "\",\"pid\":%d,\"msg\":", (int)getpid());
        ll_puts(&l, num);
        /* Members after the message must fit: keep ~1 KiB for them. */
        size_t cap = l.cap;
        if (l.cap > l.len + 1024) l.cap -= 1024;
        ll_json_str(&l, msg, mlen);
        l.cap = cap;
        for (size_t i = 0; i < nf; i++) {
            const mh_log_field_t *f = &fields[i];
            ll_puts(&l, ",\"");
            ll_puts(&l, f->key);
            ll_puts(&l, "\":");
            if (f->type == MH_LF_STR) {
                if (f->s) ll_json_str(&l, f->s, strlen(f->s));
                else ll_puts(&l, "null");
            } else if (f->type == MH_LF_INT) {
                snprintf(num, sizeof num, "%lld", f->i);
                ll_puts(&l, num);
            } else {
                snprintf(num, sizeof num, "%.3f", f->d);
                ll_puts(&l, num);
            }
        }
        ll_close(&l, '}');
    } else {
        snprintf(num, sizeof num, " %s [%d] ", tags[level & 3], (int)getpid());
        ll_puts(&l, ts);
        ll_puts(&l, num);
        ll_put(&l, msg, mlen);
    }
    ll_close(&l, '\n');
    /* One write(2) per line so lines from several processes never interleave. */
    ssize_t w = write(2, buf, l.len);
    (void)w;
}

void mh_log_write(mh_log_level_t level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_emit(level, NULL, 0, fmt, ap);
    va_end(ap);
}

void mh_log_fields(mh_log_level_t level, const mh_log_field_t *fields, size_t n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_emit(level, fields, n, fmt, ap);
    va_end(ap);
}

/* ----------------------------------------------------------------- arena */

struct mh_arena_chunk {
    mh_arena_chunk_t *next;
    size_t size, used;
    _Alignas(16) unsigned char data[];
};

struct mh_arena_cleanup {
    mh_arena_cleanup_t *next;
    void (*fn)(void *);
    void *arg;
};

#define MH_ARENA_CHUNK 8192

void mh_arena_init(mh_arena_t *a, size_t limit)
{
    a->head = NULL;
    a->cleanups = NULL;
    a->used = 0;
    a->limit = limit;
}

void mh_arena_release(mh_arena_t *a)
{
    /* Cleanups first: they may still read arena memory. */
    while (a->cleanups) {
        mh_arena_cleanup_t *c = a->cleanups;
        a->cleanups = c->next;
        c->fn(c->arg);
    }
    while (a->head) {
        mh_arena_chunk_t *c = a->head;
        a->head = c->next;
        free(c);
    }
    a->used = 0;
}

void *mh_alloc(mh_arena_t *a, size_t n)
{
    size_t need = (n + 15) & ~(size_t)15;
    if (need < n) return NULL;
    if (a->limit && (need > a->limit || a->used > a->limit - need)) return NULL;
    mh_arena_chunk_t *c = a->head;
    if (!c || c->size - c->used < need) {
        size_t size = need > MH_ARENA_CHUNK / 2 ? need : MH_ARENA_CHUNK;
        mh_arena_chunk_t *nc = malloc(sizeof *nc + size);
        if (!nc) return NULL;
        nc->size = size;
        nc->used = 0;
        if (c && need > MH_ARENA_CHUNK / 2) {
            /* A big block goes behind the current chunk so the rest of the
             * current chunk stays usable for small allocations. */
            nc->next = c->next;
            c->next = nc;
        } else {
            nc->next = c;
            a->head = nc;
        }
        c = nc;
    }
    void *p = c->data + c->used;
    c->used += need;
    a->used += need;
    return p;
}

void *mh_calloc(mh_arena_t *a, size_t n)
{
    void *p = mh_alloc(a, n);
    if (p) memset(p, 0, n);
    return p;
}

char *mh_strndup(mh_arena_t *a, const char *s, size_t n)
{
    char *p = mh_alloc(a, n + 1);
    if (!p) return NULL;
    if (n) memcpy(p, s, n);
    p[n] = 0;
    return p;
}

char *mh_strdup(mh_arena_t *a, const char *s) { return mh_strndup(a, s, strlen(s)); }

char *mh_vsprintf(mh_arena_t *a, const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    char *p = NULL;
    if (n >= 0 && (p = mh_alloc(a, (size_t)n + 1))) vsnprintf(p, (size_t)n + 1, fmt, ap);
    return p;
}

char *mh_sprintf(mh_arena_t *a, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *p = mh_vsprintf(a, fmt, ap);
    va_end(ap);
    return p;
}

int mh_arena_defer(mh_arena_t *a, void (*fn)(void *), void *arg)
{
    /* Not counted against the limit: a cleanup must always be recordable
     * once the resource exists, or it would leak. */
    size_t saved = a->limit;
    a->limit = 0;
    mh_arena_cleanup_t *c = mh_alloc(a, sizeof *c);
    a->limit = saved;
    if (!c) return MH_ENOMEM;
    c->fn = fn;
    c->arg = arg;
    c->next = a->cleanups;
    a->cleanups = c;
    return 0;
}

/* ---------------------------------------------------------------- buffer */

void *mh_vec_grow(void *p, size_t *cap, size_t need, size_t size, size_t first)
{
    if (need <= *cap) return p;
    size_t n = *cap ? *cap : first ? first : 1;
    while (n < need) n = n > SIZE_MAX / 2 ? need : n * 2;
    if (size && n > SIZE_MAX / size) return NULL;
    void *np = realloc(p, n * size);
    if (np) *cap = n;
    return np;
}

int mh_buf_reserve(mh_buf_t *b, size_t extra)
{
    if (b->cap - b->len >= extra) return 0;
    if (b->len + extra < b->len) return MH_ENOMEM;
    uint8_t *p = mh_vec_grow(b->p, &b->cap, b->len + extra, 1, 256);
    if (!p) return MH_ENOMEM;
    b->p = p;
    return 0;
}

int mh_buf_append(mh_buf_t *b, const void *data, size_t n)
{
    if (!n) return 0;
    int rc = mh_buf_reserve(b, n);
    if (rc) return rc;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

int mh_buf_append_str(mh_buf_t *b, const char *s) { return mh_buf_append(b, s, strlen(s)); }

int mh_buf_append_byte(mh_buf_t *b, uint8_t c) { return mh_buf_append(b, &c, 1); }

int mh_buf_printf(mh_buf_t *b, const char *fmt, ...)
{
    va_list ap, ap2;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    int rc = n < 0 ? MH_EINVAL : mh_buf_reserve(b, (size_t)n + 1);
    if (!rc) {
        vsnprintf((char *)b->p + b->len, (size_t)n + 1, fmt, ap2);
        b->len += (size_t)n;
    }
    va_end(ap2);
    return rc;
}

void mh_buf_free(mh_buf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

uint8_t *mh_buf_steal(mh_buf_t *b, size_t *len)
{
    uint8_t *p = b->p;
    if (len) *len = b->len;
    b->p = NULL;
    b->len = b->cap = 0;
    return p;
}

bool mh_str_eq(mh_str_t a, const char *lit)
{
    size_t n = strlen(lit);
    return a.p && a.n == n && memcmp(a.p, lit, n) == 0;
}

/* ----------------------------------------------------------- hex, base64 */

void mh_hex_encode(char *out, const uint8_t *in, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = 0;
}

/* Hex digit values plus one (0: not a digit); bit 0x80 marks the
 * uppercase digits, which ids do not allow. */
static const uint8_t HEXP1[256] = {
    ['0'] = 1,  ['1'] = 2,  ['2'] = 3,  ['3'] = 4,  ['4'] = 5,  ['5'] = 6,  ['6'] = 7,  ['7'] = 8,
    ['8'] = 9,  ['9'] = 10, ['a'] = 11, ['b'] = 12, ['c'] = 13, ['d'] = 14, ['e'] = 15, ['f'] = 16,
    ['A'] = 0x80 | 11, ['B'] = 0x80 | 12, ['C'] = 0x80 | 13, ['D'] = 0x80 | 14, ['E'] = 0x80 | 15, ['F'] = 0x80 | 16,
};

/* Decodes 2n digits; returns the OR of every digit's table entry with a
 * zero entry turned into 0x100, so callers test "any non-digit" (0x100)
 * and "any uppercase" (0x80) with one branch after the loop. */
static unsigned hex_decode(uint8_t *out, const char *in, size_t n)
{
    const uint8_t *h = (const uint8_t *)in;
    unsigned seen = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned hi = HEXP1[h[2 * i]], lo = HEXP1[h[2 * i + 1]];
        seen |= hi | lo | (hi == 0) << 8 | (lo == 0) << 8;
        out[i] = (uint8_t)(((hi - 1) & 15) << 4 | ((lo - 1) & 15));
    }
    return seen;
}

int mh_hex_decode(uint8_t *out, const char *in, size_t n)
{
    return hex_decode(out, in, n) & 0x100 ? MH_EPARSE : 0;
}

int mh_base64_encode(mh_arena_t *a, const uint8_t *in, size_t n, char **out, size_t *outlen)
{
    size_t need = 4 * ((n + 2) / 3) + 1, olen = 0;
    unsigned char *p = mh_alloc(a, need);
    if (!p) return MH_ENOMEM;
    if (mbedtls_base64_encode(p, need, &olen, in, n) != 0) return MH_ENOMEM;
    p[olen] = 0;
    *out = (char *)p;
    if (outlen) *outlen = olen;
    return 0;
}

/* Base64 digit values plus one (0: not a digit), standard alphabet. */
static const uint8_t B64P1[256] = {
    ['A'] = 1, ['B'] = 2, ['C'] = 3, ['D'] = 4, ['E'] = 5, ['F'] = 6, ['G'] = 7, ['H'] = 8, ['I'] = 9,
    ['J'] = 10, ['K'] = 11, ['L'] = 12, ['M'] = 13, ['N'] = 14, ['O'] = 15, ['P'] = 16, ['Q'] = 17, ['R'] = 18,
    ['S'] = 19, ['T'] = 20, ['U'] = 21, ['V'] = 22, ['W'] = 23, ['X'] = 24, ['Y'] = 25, ['Z'] = 26, ['a'] = 27,
    ['b'] = 28, ['c'] = 29, ['d'] = 30, ['e'] = 31, ['f'] = 32, ['g'] = 33, ['h'] = 34, ['i'] = 35, ['j'] = 36,
    ['k'] = 37, ['l'] = 38, ['m'] = 39, ['n'] = 40, ['o'] = 41, ['p'] = 42, ['q'] = 43, ['r'] = 44, ['s'] = 45,
    ['t'] = 46, ['u'] = 47, ['v'] = 48, ['w'] = 49, ['x'] = 50, ['y'] = 51, ['z'] = 52, ['0'] = 53, ['1'] = 54,
    ['2'] = 55, ['3'] = 56, ['4'] = 57, ['5'] = 58, ['6'] = 59, ['7'] = 60, ['8'] = 61, ['9'] = 62, ['+'] = 63,
    ['/'] = 64,
};

/* Our own decoder, not a library's: mbedTLS's is constant-time and about
 * 65 MB/s, ten times too slow for the up to 48 MiB of file contents a
 * server-side commit carries (which are not secrets), and OpenSSL's
 * EVP_DecodeBlock is lax (it accepts '=' in the middle of the input).
 * Strict: standard alphabet, '=' padding optional but exact when
 * present, no whitespace. */
int mh_base64_decode(mh_arena_t *a, const char *in, size_t n, uint8_t **out, size_t *outlen)
{
    size_t pad = 0;
    while (pad < 2 && n > pad && in[n - 1 - pad] == '=') pad++;
    /* Padding, when present, completes the last group of four exactly. */
    if (pad && (n % 4 != 0 || (n - pad) % 4 != 4 - pad)) return MH_EPARSE;
    n -= pad;
    if (n % 4 == 1) return MH_EPARSE;
    uint8_t *o = mh_alloc(a, n / 4 * 3 + 3);
    if (!o) return MH_ENOMEM;
    const unsigned char *p = (const unsigned char *)in;
    size_t full = n / 4 * 4, k = 0;
    for (size_t i = 0; i < full; i += 4) {
        uint32_t d0 = B64P1[p[i]], d1 = B64P1[p[i + 1]], d2 = B64P1[p[i + 2]], d3 = B64P1[p[i + 3]];
        if (!d0 || !d1 || !d2 || !d3) return MH_EPARSE;
        uint32_t v = (d0 - 1) << 18 | (d1 - 1) << 12 | (d2 - 1) << 6 | (d3 - 1);
        o[k++] = (uint8_t)(v >> 16);
        o[k++] = (uint8_t)(v >> 8);
        o[k++] = (uint8_t)v;
    }
    size_t rest = n - full; /* 0, 2 or 3 digits before the padding */
    if (rest) {
        uint32_t d0 = B64P1[p[full]], d1 = B64P1[p[full + 1]], d2 = rest == 3 ? B64P1[p[full + 2]] : 1;
        if (!d0 || !d1 || !d2) return MH_EPARSE;
        uint32_t v = (d0 - 1) << 18 | (d1 - 1) << 12 | (d2 - 1) << 6;
        o[k++] = (uint8_t)(v >> 16);
        if (rest == 3) o[k++] = (uint8_t)(v >> 8);
    }
    o[k] = 0; /* room: at most n / 4 * 3 + 2 bytes are written */
    *out = o;
    *outlen = k;
    return 0;
}

/* ------------------------------------------------------ hashing and ids */

bool mh_id_valid(const char *p, size_t n)
{
    if (!p || n != MH_ID_LEN || memcmp(p, "sha256:", 7) != 0) return false;
    for (size_t i = 7; i < n; i++) {
        char c = p[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
    }
    return true;
}

/* Graph loads decode every id of a history: one pass that checks and
 * decodes (mh_id_valid then mh_hex_decode walked each id twice). */
int mh_id_digest(const char *p, size_t n, uint8_t out[32])
{
    if (!p || n != MH_ID_LEN || memcmp(p, "sha256:", 7) != 0) return MH_EPARSE;
    return hex_decode(out, p + 7, 32) & 0x180 ? MH_EPARSE : 0;
}

void mh_id_from_digest(mh_id_t *out, const uint8_t digest[32])
{
    memcpy(out->s, "sha256:", 7);
    mh_hex_encode(out->s + 7, digest, 32);
}

struct mh_sha256 {
    EVP_MD_CTX *ctx;
};

mh_sha256_t *mh_sha256_new(void)
{
    mh_sha256_t *h = malloc(sizeof *h);
    if (!h) return NULL;
    h->ctx = EVP_MD_CTX_new();
    if (!h->ctx || EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(h->ctx);
        free(h);
        return NULL;
    }
    return h;
}

void mh_sha256_update(mh_sha256_t *h, const void *data, size_t n)
{
    if (n) EVP_DigestUpdate(h->ctx, data, n);
}

void mh_sha256_final(mh_sha256_t *h, uint8_t out[32])
{
    unsigned int len = 32;
    EVP_DigestFinal_ex(h->ctx, out, &len);
    EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL);
}

void mh_sha256_free(mh_sha256_t *h)
{
    if (!h) return;
    EVP_MD_CTX_free(h->ctx);
    free(h);
}

void mh_sha256(const void *data, size_t n, uint8_t out[32])
{
    unsigned int len = 32;
    /* EVP_Digest allocates a context per call; fine for one-shots. */
    EVP_Digest(data, n, out, &len, EVP_sha256(), NULL);
}

void mh_blob_id(const void *data, size_t n, mh_id_t *out)
{
    uint8_t d[32];
    mh_sha256(data, n, d);
    mh_id_from_digest(out, d);
}

void mh_hmac_sha256(const void *key, size_t klen, const void *data, size_t n, uint8_t out[32])
{
    mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), key, klen, data, n, out);
}

int mh_random(void *out, size_t n)
{
    uint8_t *p = out;
    while (n) {
        ssize_t r = getrandom(p, n, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            return MH_EIO;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

bool mh_ct_equal(const void *a, const void *b, size_t n)
{
    const volatile uint8_t *x = a, *y = b;
    uint8_t d = 0;
    for (size_t i = 0; i < n; i++) d |= x[i] ^ y[i];
    return d == 0;
}

/* ----------------------------------------------------------------- clock */

uint64_t mh_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t mh_now_ms(void) { return mh_now_us() / 1000u; }

int64_t mh_unix_time(void) { return (int64_t)time(NULL); }

void mh_iso_now(char *out, size_t size)
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(out, size, "%04d-%02d-%02dT%02d:%02d:%02d.%06ld+00:00", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000);
}
