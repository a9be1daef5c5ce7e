/*
 * sigv4.c — AWS Signature Version 4 for the s3 backend (header and query
 * signing) and the bounded S3 XML error scanner. See sigv4.h.
 *
 * Invariants:
 *  - Pure: no I/O, no clock, no global state; the only mutable state is
 *    the signing-key cache inside the caller's mh_sigv4_cred_t.
 *  - Canonical forms follow AWS's S3 rules exactly: the path is encoded
 *    once with '/' kept and never normalised; query names and values are
 *    encoded with '/' encoded, then sorted by name, then value (byte
 *    order); header names are lowercased, values trimmed with inner runs
 *    of spaces collapsed, sorted by name. Any deviation changes the
 *    signature, which is why the AWS published examples are unit tests.
 *  - Every input is bounded (MH_SIGV4_MAX_KV entries); temporary strings
 *    live in heap buffers freed before return.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sigv4.h"

#define ALGORITHM "AWS4-HMAC-SHA256"

/* --------------------------------------------------------------- encoding */

static bool unreserved(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_' || c == '~';
}

int mh_sigv4_uri_encode(mh_buf_t *out, const char *s, size_t n, bool keep_slash)
{
    static const char hex[] = "0123456789ABCDEF";
    /* Worst case triples the length: reserve once, then write bytes. */
    if (n > (SIZE_MAX - out->len) / 3 || mh_buf_reserve(out, 3 * n) != 0) return MH_ENOMEM;
    uint8_t *w = out->p + out->len;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (unreserved(c) || (keep_slash && c == '/')) {
            *w++ = c;
        } else {
            *w++ = '%';
            *w++ = (uint8_t)hex[c >> 4];
            *w++ = (uint8_t)hex[c & 15];
        }
    }
    out->len = (size_t)(w - out->p);
    return 0;
}

void mh_sigv4_amz_date(int64_t t, char out[17])
{
    struct tm tm;
    time_t tt = (time_t)t;
    gmtime_r(&tt, &tm);
    /* strftime: bounded by construction (always 16 characters for years
     * 1000..9999, which is every date a signature can carry). */
    if (strftime(out, 17, "%Y%m%dT%H%M%SZ", &tm) != 16) out[0] = 0;
}

/* ----------------------------------------------------------------- headers */

static char lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

/* Case-insensitive (ASCII) byte-order comparison of two header names: the
 * order of their lowercased forms. */
static int name_cmp(const char *a, const char *b)
{
    for (;; a++, b++) {
        unsigned char x = (unsigned char)lower(*a), y = (unsigned char)lower(*b);
        if (x != y || !x) return (int)x - (int)y;
    }
}

static int hdr_cmp(const void *pa, const void *pb)
{
    const mh_sigv4_kv_t *a = pa, *b = pb;
    return name_cmp(a->name, b->name);
}

/* Copies r's headers into sorted[] by lowercased name; refuses missing
 * names/values, duplicates and a request without host. */
static int sort_headers(const mh_sigv4_req_t *r, mh_sigv4_kv_t sorted[MH_SIGV4_MAX_KV])
{
    if (!r->headers || r->nheaders < 1 || r->nheaders > MH_SIGV4_MAX_KV) return MH_EINVAL;
    bool host = false;
    for (size_t i = 0; i < r->nheaders; i++) {
        if (!r->headers[i].name || !r->headers[i].name[0] || !r->headers[i].value) return MH_EINVAL;
        sorted[i] = r->headers[i];
        host |= name_cmp(sorted[i].name, "host") == 0;
    }
    if (!host) return MH_EINVAL;
    qsort(sorted, r->nheaders, sizeof *sorted, hdr_cmp);
    for (size_t i = 1; i < r->nheaders; i++)
        if (name_cmp(sorted[i - 1].name, sorted[i].name) == 0) return MH_EINVAL;
    return 0;
}

static int append_lower(mh_buf_t *out, const char *s)
{
    size_t n = strlen(s);
    if (mh_buf_reserve(out, n) != 0) return MH_ENOMEM;
    for (size_t i = 0; i < n; i++) out->p[out->len++] = (uint8_t)lower(s[i]);
    return 0;
}

/* Appends a header value trimmed of leading/trailing blanks with inner
 * runs of spaces collapsed to one ("trimall" in AWS's words). */
static int append_trimmed(mh_buf_t *out, const char *v)
{
    size_t n = strlen(v);
    while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t')) n--;
    size_t i = 0;
    while (i < n && (v[i] == ' ' || v[i] == '\t')) i++;
    if (mh_buf_reserve(out, n - i) != 0) return MH_ENOMEM;
    for (; i < n; i++) {
        if (v[i] == ' ' && out->len > 0 && out->p[out->len - 1] == ' ') continue;
        out->p[out->len++] = (uint8_t)v[i];
    }
    return 0;
}

/* "a;b;c": the sorted lowercased names. */
static int append_signed_headers(mh_buf_t *out, const mh_sigv4_kv_t *sorted, size_t n)
{
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (i > 0) rc = mh_buf_append_byte(out, ';');
        if (rc == 0) rc = append_lower(out, sorted[i].name);
    }
    return rc;
}

/* ------------------------------------------------------------------- query */

/* One encoded query parameter: offsets into a shared scratch buffer
 * (offsets, not pointers, because the buffer may move while it grows). */
typedef struct {
    size_t name, name_len, value, value_len;
    const uint8_t *base; /* set after encoding, for the comparator */
} qparam_t;

static int qparam_cmp(const void *pa, const void *pb)
{
    const qparam_t *a = pa, *b = pb;
    size_t n = a->name_len < b->name_len ? a->name_len : b->name_len;
    int c = memcmp(a->base + a->name, b->base + b->name, n);
    if (c == 0 && a->name_len != b->name_len) c = a->name_len < b->name_len ? -1 : 1;
    if (c != 0) return c;
    n = a->value_len < b->value_len ? a->value_len : b->value_len;
    c = memcmp(a->base + a->value, b->base + b->value, n);
    if (c == 0 && a->value_len != b->value_len) c = a->value_len < b->value_len ? -1 : 1;
    return c;
}

/* Appends the canonical query string of params[0..n) to out. */
static int append_canonical_query(mh_buf_t *out, const mh_sigv4_kv_t *params, size_t n)
{
    if (n == 0) return 0;
    if (n > MH_SIGV4_MAX_KV || !params) return MH_EINVAL;
    qparam_t q[MH_SIGV4_MAX_KV];
    mh_buf_t scratch = {0};
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (!params[i].name || !params[i].value) {
            rc = MH_EINVAL;
            break;
        }
        q[i].name = scratch.len;
        rc = mh_sigv4_uri_encode(&scratch, params[i].name, strlen(params[i].name), false);
        q[i].name_len = scratch.len - q[i].name;
        q[i].value = scratch.len;
        if (rc == 0) rc = mh_sigv4_uri_encode(&scratch, params[i].value, strlen(params[i].value), false);
        q[i].value_len = scratch.len - q[i].value;
    }
    if (rc == 0) {
        for (size_t i = 0; i < n; i++) q[i].base = scratch.p;
        qsort(q, n, sizeof *q, qparam_cmp);
        for (size_t i = 0; i < n && rc == 0; i++) {
            if (i > 0) rc = mh_buf_append_byte(out, '&');
            if (rc == 0) rc = mh_buf_append(out, scratch.p + q[i].name, q[i].name_len);
            if (rc == 0) rc = mh_buf_append_byte(out, '=');
            if (rc == 0) rc = mh_buf_append(out, scratch.p + q[i].value, q[i].value_len);
        }
    }
    mh_buf_free(&scratch);
    return rc;
}

/* -------------------------------------------------------- canonical request */

static bool req_valid(const mh_sigv4_req_t *r)
{
    return r && r->method && r->method[0] && r->path && r->path[0] == '/' && r->payload_hash &&
           r->payload_hash[0] && r->amz_date && strlen(r->amz_date) == 16;
}

int mh_sigv4_canonical_request(const mh_sigv4_req_t *r, mh_buf_t *out)
{
    mh_sigv4_kv_t h[MH_SIGV4_MAX_KV];
    if (!req_valid(r)) return MH_EINVAL;
    int rc = sort_headers(r, h);
    if (rc == 0) rc = mh_buf_append_str(out, r->method);
    if (rc == 0) rc = mh_buf_append_byte(out, '\n');
    if (rc == 0) rc = mh_sigv4_uri_encode(out, r->path, strlen(r->path), true);
    if (rc == 0) rc = mh_buf_append_byte(out, '\n');
    if (rc == 0) rc = append_canonical_query(out, r->query, r->nquery);
    if (rc == 0) rc = mh_buf_append_byte(out, '\n');
    for (size_t i = 0; i < r->nheaders && rc == 0; i++) {
        rc = append_lower(out, h[i].name);
        if (rc == 0) rc = mh_buf_append_byte(out, ':');
        if (rc == 0) rc = append_trimmed(out, h[i].value);
        if (rc == 0) rc = mh_buf_append_byte(out, '\n');
    }
    if (rc == 0) rc = mh_buf_append_byte(out, '\n');
    if (rc == 0) rc = append_signed_headers(out, h, r->nheaders);
    if (rc == 0) rc = mh_buf_append_byte(out, '\n');
    if (rc == 0) rc = mh_buf_append_str(out, r->payload_hash);
    return rc;
}

static bool cred_valid(const mh_sigv4_cred_t *c)
{
    return c && c->access_key && c->secret_key && c->region && c->service;
}

int mh_sigv4_string_to_sign(const mh_sigv4_cred_t *c, const mh_sigv4_req_t *r, mh_buf_t *out)
{
    if (!cred_valid(c) || !req_valid(r)) return MH_EINVAL;
    mh_buf_t canon = {0};
    int rc = mh_sigv4_canonical_request(r, &canon);
    if (rc == 0) {
        uint8_t d[32];
        char hex[65];
        mh_sha256(canon.p, canon.len, d);
        mh_hex_encode(hex, d, sizeof d);
        rc = mh_buf_printf(out, ALGORITHM "\n%s\n%.8s/%s/%s/aws4_request\n%s", r->amz_date, r->amz_date, c->region,
                           c->service, hex);
    }
    mh_buf_free(&canon);
    return rc;
}

void mh_sigv4_signing_key(const char *secret, const char *date8, const char *region, const char *service,
                          uint8_t out[32])
{
    size_t sn = strlen(secret);
    uint8_t *k0 = malloc(sn + 4);
    uint8_t k[32], k2[32];
    if (!k0) { /* tiny; cannot really fail, but never sign with garbage */
        memset(out, 0, 32);
        return;
    }
    memcpy(k0, "AWS4", 4);
    memcpy(k0 + 4, secret, sn);
    mh_hmac_sha256(k0, sn + 4, date8, 8, k);
    memset(k0, 0, sn + 4);
    free(k0);
    /* Separate buffers: never rely on HMAC tolerating key == output. */
    mh_hmac_sha256(k, 32, region, strlen(region), k2);
    mh_hmac_sha256(k2, 32, service, strlen(service), k);
    mh_hmac_sha256(k, 32, "aws4_request", 12, out);
    memset(k, 0, sizeof k);
    memset(k2, 0, sizeof k2);
}

/* The cached key of r's date, derived when the date changed. */
static const uint8_t *signing_key(mh_sigv4_cred_t *c, const char *amz_date)
{
    if (memcmp(c->key_date, amz_date, 8) != 0 || c->key_date[8] != 0) {
        mh_sigv4_signing_key(c->secret_key, amz_date, c->region, c->service, c->key);
        memcpy(c->key_date, amz_date, 8);
        c->key_date[8] = 0;
    }
    return c->key;
}

int mh_sigv4_sign(mh_sigv4_cred_t *c, const mh_sigv4_req_t *r, char sig[65])
{
    mh_buf_t sts = {0};
    sig[0] = 0;
    int rc = mh_sigv4_string_to_sign(c, r, &sts);
    if (rc == 0) {
        uint8_t mac[32];
        mh_hmac_sha256(signing_key(c, r->amz_date), 32, sts.p, sts.len, mac);
        mh_hex_encode(sig, mac, sizeof mac);
    }
    mh_buf_free(&sts);
    return rc;
}

int mh_sigv4_authorization(mh_sigv4_cred_t *c, const mh_sigv4_req_t *r, mh_buf_t *out)
{
    char sig[65];
    mh_sigv4_kv_t h[MH_SIGV4_MAX_KV];
    int rc = mh_sigv4_sign(c, r, sig);
    if (rc == 0) rc = sort_headers(r, h);
    if (rc == 0)
        rc = mh_buf_printf(out, ALGORITHM " Credential=%s/%.8s/%s/%s/aws4_request,SignedHeaders=", c->access_key,
                           r->amz_date, c->region, c->service);
    if (rc == 0) rc = append_signed_headers(out, h, r->nheaders);
    if (rc == 0) rc = mh_buf_printf(out, ",Signature=%s", sig);
    return rc;
}

int mh_sigv4_presign(mh_sigv4_cred_t *c, const mh_sigv4_req_t *r, uint32_t expires_s, mh_buf_t *out)
{
    enum { AUTH_PARAMS = 5 };
    if (!cred_valid(c) || !req_valid(r) || expires_s < 1 || expires_s > MH_SIGV4_MAX_EXPIRES) return MH_EINVAL;
    if (r->nquery > MH_SIGV4_MAX_KV - AUTH_PARAMS || (r->nquery && !r->query)) return MH_EINVAL;
    mh_sigv4_kv_t h[MH_SIGV4_MAX_KV], q[MH_SIGV4_MAX_KV];
    int rc = sort_headers(r, h);
    if (rc != 0) return rc;
    mh_buf_t cred = {0}, signed_hdrs = {0};
    char exp[16], sig[65];
    snprintf(exp, sizeof exp, "%u", expires_s);
    rc = mh_buf_printf(&cred, "%s/%.8s/%s/%s/aws4_request", c->access_key, r->amz_date, c->region, c->service);
    if (rc == 0) rc = append_signed_headers(&signed_hdrs, h, r->nheaders);
    if (rc == 0) rc = mh_buf_append_byte(&cred, 0);
    if (rc == 0) rc = mh_buf_append_byte(&signed_hdrs, 0);
    if (rc == 0) {
        for (size_t i = 0; i < r->nquery; i++) q[i] = r->query[i];
        size_t n = r->nquery;
        q[n++] = (mh_sigv4_kv_t){"X-Amz-Algorithm", ALGORITHM};
        q[n++] = (mh_sigv4_kv_t){"X-Amz-Credential", (const char *)cred.p};
        q[n++] = (mh_sigv4_kv_t){"X-Amz-Date", r->amz_date};
        q[n++] = (mh_sigv4_kv_t){"X-Amz-Expires", exp};
        q[n++] = (mh_sigv4_kv_t){"X-Amz-SignedHeaders", (const char *)signed_hdrs.p};
        mh_sigv4_req_t full = *r;
        full.query = q;
        full.nquery = n;
        rc = mh_sigv4_sign(c, &full, sig);
        /* The URL carries the same canonical (encoded, sorted) query the
         * signature covers, so no client re-encoding can change it. */
        if (rc == 0) rc = append_canonical_query(out, q, n);
        if (rc == 0) rc = mh_buf_append_str(out, "&X-Amz-Signature=");
        if (rc == 0) rc = mh_buf_append(out, sig, 64);
    }
    mh_buf_free(&cred);
    mh_buf_free(&signed_hdrs);
    return rc;
}

/* ------------------------------------------------------ S3 error bodies */

static const char *find(const char *p, const char *end, const char *lit, size_t litn)
{
    if (p >= end || (size_t)(end - p) < litn) return NULL;
    return memmem(p, (size_t)(end - p), lit, litn);
}

/* Copies the text between <tag> and </tag> inside [p, end) into out,
 * printable ASCII only. True when the element was found. */
static bool element_text(const char *p, const char *end, const char *tag, char *out, size_t size)
{
    char open[24], close[24];
    int on = snprintf(open, sizeof open, "<%s>", tag), cn = snprintf(close, sizeof close, "</%s>", tag);
    const char *s = find(p, end, open, (size_t)on);
    if (!s) return false;
    s += on;
    const char *e = find(s, end, close, (size_t)cn);
    if (!e) return false;
    if (out && size > 0) {
        size_t n = (size_t)(e - s);
        if (n > size - 1) n = size - 1;
        for (size_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)s[i];
            out[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
        }
        out[n] = 0;
    }
    return true;
}

int mh_s3_xml_error(const char *body, size_t n, char *code, size_t code_size, char *msg, size_t msg_size)
{
    if (code && code_size) code[0] = 0;
    if (msg && msg_size) msg[0] = 0;
    if (!body) return MH_EPARSE;
    if (n > MH_S3_XML_SCAN_MAX) n = MH_S3_XML_SCAN_MAX;
    const char *end = body + n;
    const char *e = find(body, end, "<Error>", 7);
    if (!e) return MH_EPARSE;
    e += 7;
    /* Stay inside this element: a <Code> after </Error> is not its code. */
    const char *close = find(e, end, "</Error>", 8);
    if (close) end = close;
    if (!element_text(e, end, "Code", code, code_size)) {
        if (code && code_size) code[0] = 0;
        return MH_EPARSE;
    }
    if (!element_text(e, end, "Message", msg, msg_size) && msg && msg_size) msg[0] = 0;
    return 0;
}

/* ------------------------------------------------------ S3 result bodies */

const char *mh_s3_xml_next(const char *p, const char *end, const char *tag, const char **inner, size_t *inner_n)
{
    char open[40], close[40];
    int on = snprintf(open, sizeof open, "<%s", tag), cn = snprintf(close, sizeof close, "</%s>", tag);
    if (on <= 0 || (size_t)on >= sizeof open || cn <= 0 || (size_t)cn >= sizeof close || !p) return NULL;
    const char *s = p;
    for (;;) { /* "<tag>" or "<tag attr=...>" (S3 puts xmlns on the root) */
        s = find(s, end, open, (size_t)on);
        if (!s) return NULL;
        s += on;
        if (s < end && (*s == '>' || *s == ' ' || *s == '\t' || *s == '\r' || *s == '\n')) break;
    }
    const char *gt = memchr(s, '>', (size_t)(end - s));
    if (!gt || gt[-1] == '/') return NULL; /* no end, or an empty element <tag/> */
    s = gt + 1;
    const char *e = find(s, end, close, (size_t)cn);
    if (!e) return NULL;
    *inner = s;
    *inner_n = (size_t)(e - s);
    return e + cn;
}

int mh_s3_xml_text(const char *p, size_t n, const char *tag, char *out, size_t size)
{
    const char *in;
    size_t inn;
    if (!mh_s3_xml_next(p, p + n, tag, &in, &inn)) return MH_EPARSE;
    static const struct {
        const char *ent;
        char c;
    } ents[] = {{"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
    size_t o = 0;
    for (size_t i = 0; i < inn;) {
        unsigned char c = (unsigned char)in[i];
        if (c < 0x20 || c >= 0x7f) return MH_EINVAL;
        size_t adv = 1;
        if (c == '&') {
            size_t k = 0;
            for (; k < sizeof ents / sizeof *ents; k++) {
                size_t en = strlen(ents[k].ent);
                if (inn - i >= en && memcmp(in + i, ents[k].ent, en) == 0) {
                    c = (unsigned char)ents[k].c;
                    adv = en;
                    break;
                }
            }
            if (k == sizeof ents / sizeof *ents) return MH_EINVAL;
        }
        if (o + 1 >= size) return MH_ELIMIT;
        out[o++] = (char)c;
        i += adv;
    }
    if (size == 0) return MH_ELIMIT;
    out[o] = 0;
    return 0;
}

int mh_s3_iso_time(const char *s, int64_t *out)
{
    int y, mo, d, h, mi, sec;
    if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d", &y, &mo, &d, &h, &mi, &sec) != 6 || y < 1970 || mo < 1 || mo > 12 ||
        d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60)
        return MH_EPARSE;
    /* Days from the civil date (Howard Hinnant's algorithm): no timegm,
     * no locale, no time zone. */
    int yy = y - (mo <= 2);
    int era = yy / 400;
    int yoe = yy - era * 400;
    int doy = (153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    int64_t days = (int64_t)era * 146097 + doe - 719468;
    *out = days * 86400 + h * 3600 + mi * 60 + sec;
    return 0;
}
