/*
 * sf.c — RFC 8941 structured field values: a strict Dictionary parser and
 * the canonical serializer (include/mh/auth.h). MSign's Signature-Input,
 * Signature and Content-Digest headers are Dictionaries (SPEC 5).
 *
 * Invariants:
 *  - The parser follows the algorithms of RFC 8941 section 4.2 step by
 *    step and fails on anything they fail on; it never reads past p + n.
 *  - Every count is bounded (MH_SF_MAX_*), so a header cannot make us
 *    allocate more than a small multiple of its own size.
 *  - Keys and tokens point into the input; strings and byte sequences are
 *    decoded into the arena (NUL-terminated for convenience).
 *  - Serialization is canonical (RFC 8941 4.1), so parse -> serialize ->
 *    parse -> serialize is a fixed point (the fuzz target checks it).
 */
#include <stdio.h>
#include <string.h>

#include "mh/auth.h"

typedef struct {
    mh_arena_t *a;
    const char *p, *end;
    const char *why;
    int err;
} sfp_t;

static int fail(sfp_t *s, int err, const char *why)
{
    if (!s->err) {
        s->err = err;
        s->why = why;
    }
    return err;
}

static bool at_end(const sfp_t *s) { return s->p >= s->end; }
static int peek(const sfp_t *s) { return s->p < s->end ? (unsigned char)*s->p : -1; }

static bool is_lcalpha(int c) { return c >= 'a' && c <= 'z'; }
static bool is_alpha(int c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static bool is_digit(int c) { return c >= '0' && c <= '9'; }

/* RFC 9110 tchar. */
static bool is_tchar(int c)
{
    if (is_alpha(c) || is_digit(c)) return true;
    return c > 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static void skip_sp(sfp_t *s)
{
    while (s->p < s->end && *s->p == ' ') s->p++;
}

static void skip_ows(sfp_t *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t')) s->p++;
}

/* Grows an arena array of `size`-byte elements to hold n + 1 (doubling;
 * the old block is abandoned to the arena, bounded by the MH_SF_MAX_*). */
static void *grow(sfp_t *s, void *arr, uint32_t n, uint32_t *cap, size_t size)
{
    if (n < *cap) return arr;
    uint32_t ncap = *cap ? *cap * 2 : 4;
    void *na = mh_alloc(s->a, (size_t)ncap * size);
    if (!na) {
        fail(s, MH_ENOMEM, "out of memory");
        return NULL;
    }
    if (n) memcpy(na, arr, (size_t)n * size);
    *cap = ncap;
    return na;
}

/* 4.2.3.3 Parsing a Key. */
static int parse_key(sfp_t *s, mh_str_t *out)
{
    int c = peek(s);
    if (!is_lcalpha(c) && c != '*') return fail(s, MH_EPARSE, "a key must start with a-z or '*'");
    const char *start = s->p;
    while (s->p < s->end) {
        c = (unsigned char)*s->p;
        if (!(is_lcalpha(c) || is_digit(c) || c == '_' || c == '-' || c == '.' || c == '*')) break;
        s->p++;
    }
    out->p = start;
    out->n = (size_t)(s->p - start);
    return 0;
}

/* 4.2.4 Parsing an Integer or Decimal. Decimals are kept in thousandths
 * (at most three fractional digits), so no floating point is involved. */
static int parse_number(sfp_t *s, mh_sf_bare_t *out)
{
    bool neg = false, dec = false;
    if (peek(s) == '-') {
        neg = true;
        s->p++;
    }
    if (!is_digit(peek(s))) return fail(s, MH_EPARSE, "a number needs a digit");
    int64_t ipart = 0, frac = 0;
    int ilen = 0, flen = 0;
    while (s->p < s->end) {
        int c = (unsigned char)*s->p;
        if (is_digit(c)) {
            if (!dec) {
                if (++ilen > 15) return fail(s, MH_EPARSE, "integer longer than 15 digits");
                ipart = ipart * 10 + (c - '0');
            } else {
                if (++flen > 3) return fail(s, MH_EPARSE, "more than 3 fractional digits");
                frac = frac * 10 + (c - '0');
            }
        } else if (c == '.' && !dec) {
            if (ilen > 12) return fail(s, MH_EPARSE, "decimal integer part longer than 12 digits");
            dec = true;
        } else {
            break;
        }
        s->p++;
    }
    if (!dec) {
        out->t = MH_SF_INT;
        out->i = neg ? -ipart : ipart;
        return 0;
    }
    if (flen == 0) return fail(s, MH_EPARSE, "a decimal cannot end with '.'");
    for (int k = flen; k < 3; k++) frac *= 10;
    out->t = MH_SF_DEC;
    out->i = (neg ? -1 : 1) * (ipart * 1000 + frac);
    return 0;
}

/* 4.2.5 Parsing a String: printable ASCII, escapes only \" and \\. */
static int parse_string(sfp_t *s, mh_sf_bare_t *out)
{
    s->p++; /* the opening quote */
    const char *start = s->p;
    size_t len = 0;
    /* First pass: validate and measure. */
    for (const char *q = start;; q++) {
        if (q >= s->end) return fail(s, MH_EPARSE, "unterminated string");
        unsigned char c = (unsigned char)*q;
        if (c == '\\') {
            if (q + 1 >= s->end) return fail(s, MH_EPARSE, "unterminated string");
            if (q[1] != '"' && q[1] != '\\') return fail(s, MH_EPARSE, "bad escape in string");
            q++;
        } else if (c == '"') {
            break;
        } else if (c < 0x20 || c > 0x7e) {
            return fail(s, MH_EPARSE, "non-printable character in string");
        }
        len++;
    }
    char *buf = mh_alloc(s->a, len + 1);
    if (!buf) return fail(s, MH_ENOMEM, "out of memory");
    size_t j = 0;
    while (*s->p != '"') {
        if (*s->p == '\\') s->p++;
        buf[j++] = *s->p++;
    }
    s->p++; /* the closing quote */
    buf[j] = 0;
    out->t = MH_SF_STR;
    out->s = (mh_str_t){buf, j};
    return 0;
}

/* 4.2.6 Parsing a Token. */
static int parse_token(sfp_t *s, mh_sf_bare_t *out)
{
    const char *start = s->p++;
    while (s->p < s->end) {
        int c = (unsigned char)*s->p;
        if (!(is_tchar(c) || c == ':' || c == '/')) break;
        s->p++;
    }
    out->t = MH_SF_TOKEN;
    out->s = (mh_str_t){start, (size_t)(s->p - start)};
    return 0;
}

static bool is_b64(int c) { return is_alpha(c) || is_digit(c) || c == '+' || c == '/'; }

/* 4.2.7 Parsing a Byte Sequence. Padding may be absent and pad bits are
 * not checked, as the RFC advises; '=' may only end the sequence and only
 * complete a 4-character group. Decoded by core's base64 (the one of the
 * program), which has exactly these rules. */
static int parse_bytes(sfp_t *s, mh_sf_bare_t *out)
{
    s->p++; /* ':' */
    const char *start = s->p;
    while (s->p < s->end && *s->p != ':') {
        int c = (unsigned char)*s->p;
        if (!is_b64(c) && c != '=') return fail(s, MH_EPARSE, "bad character in byte sequence");
        s->p++;
    }
    if (at_end(s)) return fail(s, MH_EPARSE, "unterminated byte sequence");
    const char *stop = s->p;
    s->p++; /* ':' */
    uint8_t *buf = NULL;
    size_t n = 0;
    int rc = mh_base64_decode(s->a, start, (size_t)(stop - start), &buf, &n);
    if (rc == MH_ENOMEM) return fail(s, MH_ENOMEM, "out of memory");
    if (rc) return fail(s, MH_EPARSE, "malformed base64 in byte sequence");
    out->t = MH_SF_BYTES;
    out->s = (mh_str_t){(const char *)buf, n};
    return 0;
}

/* 4.2.3.1 Parsing a Bare Item. */
static int parse_bare(sfp_t *s, mh_sf_bare_t *out)
{
    int c = peek(s);
    if (c == '-' || is_digit(c)) return parse_number(s, out);
    if (c == '"') return parse_string(s, out);
    if (c == '*' || is_alpha(c)) return parse_token(s, out);
    if (c == ':') return parse_bytes(s, out);
    if (c == '?') {
        s->p++;
        c = peek(s);
        if (c != '0' && c != '1') return fail(s, MH_EPARSE, "a boolean is ?0 or ?1");
        s->p++;
        out->t = MH_SF_BOOL;
        out->i = c == '1';
        return 0;
    }
    return fail(s, MH_EPARSE, "not a bare item");
}

/* 4.2.3.2 Parsing Parameters. A repeated key overwrites the value and
 * keeps its first position. */
static int parse_params(sfp_t *s, mh_sf_params_t *out)
{
    uint32_t cap = 0;
    out->p = NULL;
    out->n = 0;
    while (peek(s) == ';') {
        s->p++;
        skip_sp(s);
        mh_str_t key;
        if (parse_key(s, &key)) return s->err;
        mh_sf_bare_t v = {.t = MH_SF_BOOL, .i = 1};
        if (peek(s) == '=') {
            s->p++;
            if (parse_bare(s, &v)) return s->err;
        }
        uint32_t k = 0;
        while (k < out->n && !(out->p[k].key.n == key.n && !memcmp(out->p[k].key.p, key.p, key.n))) k++;
        if (k < out->n) {
            out->p[k].v = v;
            continue;
        }
        if (out->n >= MH_SF_MAX_PARAMS) return fail(s, MH_ELIMIT, "too many parameters");
        if (!(out->p = grow(s, out->p, out->n, &cap, sizeof *out->p))) return s->err;
        out->p[out->n++] = (mh_sf_param_t){key, v};
    }
    return 0;
}

/* 4.2.3 Parsing an Item. */
static int parse_item(sfp_t *s, mh_sf_item_t *out)
{
    if (parse_bare(s, &out->v)) return s->err;
    return parse_params(s, &out->params);
}

/* 4.2.1.2 Parsing an Inner List. */
static int parse_inner(sfp_t *s, mh_sf_member_t *m)
{
    uint32_t cap = 0;
    s->p++; /* '(' */
    m->inner = true;
    m->items = NULL;
    m->nitems = 0;
    while (!at_end(s)) {
        skip_sp(s);
        if (peek(s) == ')') {
            s->p++;
            return parse_params(s, &m->params);
        }
        if (m->nitems >= MH_SF_MAX_ITEMS) return fail(s, MH_ELIMIT, "too many items in an inner list");
        if (!(m->items = grow(s, m->items, m->nitems, &cap, sizeof *m->items))) return s->err;
        if (parse_item(s, &m->items[m->nitems])) return s->err;
        m->nitems++;
        int c = peek(s);
        if (c != ' ' && c != ')') return fail(s, MH_EPARSE, "inner list items need a space or ')' after them");
    }
    return fail(s, MH_EPARSE, "unterminated inner list");
}

/* 4.2.2 Parsing a Dictionary. */
static int parse_dict(sfp_t *s, mh_sf_dict_t *d)
{
    uint32_t cap = 0;
    d->m = NULL;
    d->n = 0;
    while (!at_end(s)) {
        mh_sf_member_t m;
        memset(&m, 0, sizeof m);
        if (parse_key(s, &m.key)) return s->err;
        if (peek(s) == '=') {
            s->p++;
            if (peek(s) == '(') {
                if (parse_inner(s, &m)) return s->err;
            } else if (parse_item(s, &m.item)) {
                return s->err;
            }
        } else {
            m.item.v = (mh_sf_bare_t){.t = MH_SF_BOOL, .i = 1};
            if (parse_params(s, &m.item.params)) return s->err;
        }
        uint32_t k = 0;
        d->nparsed++;
        while (k < d->n && !(d->m[k].key.n == m.key.n && !memcmp(d->m[k].key.p, m.key.p, m.key.n))) k++;
        if (k < d->n) {
            d->m[k] = m; /* overwrite, keep the position */
        } else {
            if (d->n >= MH_SF_MAX_MEMBERS) return fail(s, MH_ELIMIT, "too many dictionary members");
            if (!(d->m = grow(s, d->m, d->n, &cap, sizeof *d->m))) return s->err;
            d->m[d->n++] = m;
        }
        skip_ows(s);
        if (at_end(s)) return 0;
        if (*s->p != ',') return fail(s, MH_EPARSE, "dictionary members must be separated by ','");
        s->p++;
        skip_ows(s);
        if (at_end(s)) return fail(s, MH_EPARSE, "trailing ',' in dictionary");
    }
    return 0;
}

int mh_sf_parse_dict(mh_arena_t *a, const char *p, size_t n, mh_sf_dict_t *out, const char **why)
{
    sfp_t s = {.a = a, .p = p, .end = p + n};
    memset(out, 0, sizeof *out);
    skip_sp(&s);
    if (!parse_dict(&s, out)) {
        skip_sp(&s);
        if (!at_end(&s)) fail(&s, MH_EPARSE, "trailing characters");
    }
    if (s.err) {
        if (why) *why = s.why;
        memset(out, 0, sizeof *out);
        return s.err;
    }
    return 0;
}

const mh_sf_member_t *mh_sf_dict_get(const mh_sf_dict_t *d, const char *key)
{
    size_t n = strlen(key);
    for (uint32_t i = 0; i < d->n; i++)
        if (d->m[i].key.n == n && !memcmp(d->m[i].key.p, key, n)) return &d->m[i];
    return NULL;
}

const mh_sf_bare_t *mh_sf_param_get(const mh_sf_params_t *ps, const char *key)
{
    size_t n = strlen(key);
    for (uint32_t i = 0; i < ps->n; i++)
        if (ps->p[i].key.n == n && !memcmp(ps->p[i].key.p, key, n)) return &ps->p[i].v;
    return NULL;
}

/* ------------------------------------------------------- serialization */

static int ser_bare(mh_buf_t *o, const mh_sf_bare_t *v)
{
    int rc = 0;
    switch (v->t) {
    case MH_SF_INT:
        return mh_buf_printf(o, "%lld", (long long)v->i);
    case MH_SF_DEC: {
        /* 4.1.5: at least one fractional digit, no trailing zeros. */
        uint64_t a = v->i < 0 ? (uint64_t)0 - (uint64_t)v->i : (uint64_t)v->i;
        unsigned f = (unsigned)(a % 1000);
        char fr[4];
        snprintf(fr, sizeof fr, "%03u", f);
        int fl = 3;
        while (fl > 1 && fr[fl - 1] == '0') fl--;
        return mh_buf_printf(o, "%s%llu.%.*s", v->i < 0 ? "-" : "", (unsigned long long)(a / 1000), fl, fr);
    }
    case MH_SF_STR: {
        /* Copy runs between the characters that need a backslash. */
        size_t from = 0;
        rc = mh_buf_append_byte(o, '"');
        for (size_t i = 0; !rc && i < v->s.n; i++) {
            char c = v->s.p[i];
            if (c != '"' && c != '\\') continue;
            if (!(rc = mh_buf_append(o, v->s.p + from, i - from))) rc = mh_buf_append_byte(o, '\\');
            from = i;
        }
        if (!rc) rc = mh_buf_append(o, v->s.p + from, v->s.n - from);
        return rc ? rc : mh_buf_append_byte(o, '"');
    }
    case MH_SF_TOKEN:
        return mh_buf_append(o, v->s.p, v->s.n);
    case MH_SF_BYTES: {
        static const char al[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        const uint8_t *b = (const uint8_t *)v->s.p;
        rc = mh_buf_append_byte(o, ':');
        for (size_t i = 0; !rc && i < v->s.n; i += 3) {
            uint32_t x = (uint32_t)b[i] << 16;
            if (i + 1 < v->s.n) x |= (uint32_t)b[i + 1] << 8;
            if (i + 2 < v->s.n) x |= b[i + 2];
            char q[4] = {al[x >> 18], al[(x >> 12) & 63], i + 1 < v->s.n ? al[(x >> 6) & 63] : '=',
                         i + 2 < v->s.n ? al[x & 63] : '='};
            rc = mh_buf_append(o, q, 4);
        }
        return rc ? rc : mh_buf_append_byte(o, ':');
    }
    case MH_SF_BOOL:
        return mh_buf_append(o, v->i ? "?1" : "?0", 2);
    }
    return MH_EINVAL;
}

static int ser_params(mh_buf_t *o, const mh_sf_params_t *ps)
{
    for (uint32_t i = 0; i < ps->n; i++) {
        const mh_sf_param_t *p = &ps->p[i];
        int rc = mh_buf_append_byte(o, ';');
        if (!rc) rc = mh_buf_append(o, p->key.p, p->key.n);
        if (rc) return rc;
        if (p->v.t == MH_SF_BOOL && p->v.i == 1) continue;
        if ((rc = mh_buf_append_byte(o, '=')) || (rc = ser_bare(o, &p->v))) return rc;
    }
    return 0;
}

static int ser_item(mh_buf_t *o, const mh_sf_item_t *it)
{
    int rc = ser_bare(o, &it->v);
    return rc ? rc : ser_params(o, &it->params);
}

int mh_sf_serialize_member(mh_buf_t *out, const mh_sf_member_t *m)
{
    if (!m->inner) return ser_item(out, &m->item);
    int rc = mh_buf_append_byte(out, '(');
    for (uint32_t i = 0; !rc && i < m->nitems; i++) {
        if (i) rc = mh_buf_append_byte(out, ' ');
        if (!rc) rc = ser_item(out, &m->items[i]);
    }
    if (!rc) rc = mh_buf_append_byte(out, ')');
    return rc ? rc : ser_params(out, &m->params);
}

int mh_sf_serialize_dict(mh_buf_t *out, const mh_sf_dict_t *d)
{
    for (uint32_t i = 0; i < d->n; i++) {
        const mh_sf_member_t *m = &d->m[i];
        int rc = i ? mh_buf_append(out, ", ", 2) : 0;
        if (!rc) rc = mh_buf_append(out, m->key.p, m->key.n);
        if (rc) return rc;
        if (!m->inner && m->item.v.t == MH_SF_BOOL && m->item.v.i == 1) rc = ser_params(out, &m->item.params);
        else if (!(rc = mh_buf_append_byte(out, '='))) rc = mh_sf_serialize_member(out, m);
        if (rc) return rc;
    }
    return 0;
}
