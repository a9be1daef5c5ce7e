/*
 * test_msign.c — MSign (SPEC 5): RFC 8941 dictionary parsing and
 * serialization (valid and malformed inputs), the RFC 9421 signature base
 * against the RFC's own example bases, verification of the RFC's published
 * ecdsa-p256-sha256 signature with its test key test-key-ecc-p256, a
 * signature made by scripts/msign.py (a second implementation), the strict
 * MSign header rules, the time window, the body digest, key parsing and
 * key ids, the rate limiter and handle rules.
 */
#include <mbedtls/ecdsa.h>
#include <mbedtls/pk.h>
#include <stdio.h>
#include <string.h>

#include "mh/auth.h"
#include "tap.h"

static mh_arena_t A;

/* --------------------------------------------------------------- vectors */

/* RFC 9421 B.1.3 test-key-ecc-p256 (public half). */
static const char rfc_p256_pub[] = "-----BEGIN PUBLIC KEY-----\n"
                                   "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqIVYZVLCrPZHGHjP17CTW0/+D9Lf\n"
                                   "w0EkjqF7xB4FivAxzic30tMM4GF+hR6Dxh71Z50VGGdldkkDXZCnTNnoXQ==\n"
                                   "-----END PUBLIC KEY-----\n";
/* Its key id (SPEC 1), computed with Python hashlib over the DER SPKI. */
static const char rfc_p256_keyid[] = "sha256:55f96361b78cbb84f1fc604b0718e82bd91abb46d8fc25ae871b35fbbf8b7974";

/* RFC 9421 B.2.3 (full coverage, rsa-pss-sha512: checked for the base
 * only). */
static const char b23_input[] = "sig-b23=(\"date\" \"@method\" \"@path\" \"@query\" \"@authority\" \"content-type\" "
                                "\"content-digest\" \"content-length\");created=1618884473;keyid=\"test-key-rsa-pss\"";
static const char b23_base[] =
    "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n"
    "\"@method\": POST\n"
    "\"@path\": /foo\n"
    "\"@query\": ?param=Value&Pet=dog\n"
    "\"@authority\": example.com\n"
    "\"content-type\": application/json\n"
    "\"content-digest\": sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:\n"
    "\"content-length\": 18\n"
    "\"@signature-params\": (\"date\" \"@method\" \"@path\" \"@query\" \"@authority\" \"content-type\" "
    "\"content-digest\" \"content-length\");created=1618884473;keyid=\"test-key-rsa-pss\"";

/* RFC 9421 B.2.4 (a response signed with ecdsa-p256-sha256). */
static const char b24_input[] = "sig-b24=(\"@status\" \"content-type\" \"content-digest\" \"content-length\")"
                                ";created=1618884473;keyid=\"test-key-ecc-p256\"";
static const char b24_sig[] =
    "sig-b24=:wNmSUAhwb5LxtOtOpNa6W5xj067m5hFrj0XQ4fvpaCLx0NKocgPquLgyahnzDnDAUy5eCdlYUEkLIj+32oiasw==:";
static const char b24_base[] =
    "\"@status\": 200\n"
    "\"content-type\": application/json\n"
    "\"content-digest\": sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ41QJgJc4GTsPp29l5oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:\n"
    "\"content-length\": 23\n"
    "\"@signature-params\": (\"@status\" \"content-type\" \"content-digest\" \"content-length\")"
    ";created=1618884473;keyid=\"test-key-ecc-p256\"";

/* Made by `scripts/msign.py sign --key <RFC test key> --created 1700000000
 * --body-file <{"want":["x"]}> POST 'http://127.0.0.1:1337/gabriel/my-repo/fetch?x=1&y=%20'`
 * and the same for GET .../gabriel/my-repo/refs without a body. */
static const char py_body[] = "{\"want\":[\"x\"]}";
static const char py_digest[] = "sha-256=:onm1++yQpnSBzSwI/wBivHu0kuw+lae9SaHz2hUB9Uw=:";
static const char py_input_body[] =
    "msign=(\"@method\" \"@path\" \"@query\" \"content-digest\");created=1700000000;"
    "keyid=\"sha256:55f96361b78cbb84f1fc604b0718e82bd91abb46d8fc25ae871b35fbbf8b7974\";alg=\"ecdsa-p256-sha256\"";
static const char py_sig_body[] =
    "msign=:Ka+sp876qzmFQWe5yK/P5Je0FZHHq12SWCzAGJARmpNw5phob4lUZthyLTLGX2N8X4elamGbWreLI/56oKDeZg==:";
static const char py_input_get[] =
    "msign=(\"@method\" \"@path\" \"@query\");created=1700000000;"
    "keyid=\"sha256:55f96361b78cbb84f1fc604b0718e82bd91abb46d8fc25ae871b35fbbf8b7974\";alg=\"ecdsa-p256-sha256\"";
static const char py_sig_get[] =
    "msign=:DajJtY9cwYV4xsZiakLF0ERnCoUp2lyFvR1x0YpJZvJSXMNuXCg4gp84d6neCUweke3nSFhuD1aU8/HGoOA3YQ==:";
/* msign.py made (r, s) with s > n/2 before it normalized to low-S; this is
 * that original: the same signature's other half, refused (SPEC 5). */
static const char py_sig_get_high[] =
    "msign=:DajJtY9cwYV4xsZiakLF0ERnCoUp2lyFvR1x0YpJZvKtozyQo9fHfmDHiFYh9rPhKvkTZU6pjy5exdj8W4Lt8A==:";

static mh_str_t S(const char *s) { return (mh_str_t){s, strlen(s)}; }

/* ---------------------------------------------------- structured fields */

/* Parses then serializes; returns the serialization (arena) or NULL. */
static char *roundtrip(const char *in)
{
    mh_sf_dict_t d;
    const char *why = NULL;
    if (mh_sf_parse_dict(&A, in, strlen(in), &d, &why)) return NULL;
    mh_buf_t b = {0};
    if (mh_sf_serialize_dict(&b, &d)) return NULL;
    char *s = mh_strndup(&A, b.len ? (const char *)b.p : "", b.len);
    mh_buf_free(&b);
    return s;
}

static void test_sf_valid(void)
{
    static const struct {
        const char *in, *out;
    } cases[] = {
        {"a=1", "a=1"},
        {"  a=1 ,  b=2  ", "a=1, b=2"},
        {"a=1,\tb=2", "a=1, b=2"},
        {"a", "a"},
        {"a=?1", "a"},
        {"a=?0", "a=?0"},
        {"a;x=1, b=2;y", "a;x=1, b=2;y"},
        {"a=-42", "a=-42"},
        {"a=999999999999999", "a=999999999999999"},
        {"a=1.5", "a=1.5"},
        {"a=1.250", "a=1.25"},
        {"a=-0.001", "a=-0.001"},
        {"a=123456789012.123", "a=123456789012.123"},
        {"a=\"he said \\\"hi\\\" \\\\o/\"", "a=\"he said \\\"hi\\\" \\\\o/\""},
        {"a=\"\"", "a=\"\""},
        {"a=tok/en:x*", "a=tok/en:x*"},
        {"a=*tok", "a=*tok"},
        {"a=:aGVsbG8=:", "a=:aGVsbG8=:"},
        {"a=:aGVsbG8:", "a=:aGVsbG8=:"}, /* padding may be absent (RFC 8941 4.2.7) */
        {"a=::", "a=::"},
        {"a=()", "a=()"},
        {"a=(  1   2 )", "a=(1 2)"},
        {"a=(\"x\";p=1 tok);q=?0;r", "a=(\"x\";p=1 tok);q=?0;r"},
        {"a=1, a=2", "a=2"},             /* later value wins, first position kept */
        {"a=1, b=2, a=3", "a=3, b=2"},
        {"a=1;p=1;p=2", "a=1;p=2"},
        {"*x=1", "*x=1"},
        {"a-b.c_d*=1", "a-b.c_d*=1"},
        {"", ""},
        {"a;  p=1", "a;p=1"},
        {"a=1\t", "a=1"}, /* OWS after a member (4.2.2) */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *got = roundtrip(cases[i].in);
        char name[160];
        snprintf(name, sizeof name, "sf valid: %s", cases[i].in);
        TAP_EQ_STR(got, cases[i].out, name);
        /* Canonical output is a fixed point. */
        if (got) TAP_EQ_STR(roundtrip(got), got, "sf canonical output reparses to itself");
    }
}

static void test_sf_values(void)
{
    mh_sf_dict_t d;
    const char *in = "sig=(\"@method\" \"x\");created=1618884473;keyid=\"k\", b=:AAEC:, c=-1.5, t=?1";
    TAP_EQ_INT(mh_sf_parse_dict(&A, in, strlen(in), &d, NULL), 0, "sf parses a mixed dictionary");
    TAP_EQ_INT(d.n, 4, "four members");
    const mh_sf_member_t *m = mh_sf_dict_get(&d, "sig");
    TAP_OK(m && m->inner && m->nitems == 2 && m->items[0].v.t == MH_SF_STR && mh_str_eq(m->items[0].v.s, "@method"),
           "inner list of strings");
    const mh_sf_bare_t *cr = m ? mh_sf_param_get(&m->params, "created") : NULL;
    TAP_OK(cr && cr->t == MH_SF_INT && cr->i == 1618884473, "created parameter is an integer");
    const mh_sf_member_t *b = mh_sf_dict_get(&d, "b");
    TAP_OK(b && !b->inner && b->item.v.t == MH_SF_BYTES && b->item.v.s.n == 3 &&
               !memcmp(b->item.v.s.p, "\x00\x01\x02", 3),
           "byte sequence decoded");
    const mh_sf_member_t *c = mh_sf_dict_get(&d, "c");
    TAP_OK(c && c->item.v.t == MH_SF_DEC && c->item.v.i == -1500, "decimal in thousandths");
    TAP_OK(mh_sf_dict_get(&d, "nope") == NULL, "absent member");
}

static void test_sf_malformed(void)
{
    static const char *bad[] = {
        "A=1",                 /* key must be lowercase */
        "1a=1",                /* key must start with a letter or '*' */
        "a=1,",                /* trailing comma */
        "a=1,,b=2",            /* empty member */
        ",a=1",                /* leading comma */
        "a=1 b=2",             /* missing comma */
        "a=",                  /* missing value */
        "a=1000000000000000",  /* 16-digit integer */
        "a=1234567890123.1",   /* 13-digit integer part */
        "a=1.2345",            /* 4 fractional digits */
        "a=1.",                /* trailing dot */
        "a=-",                 /* sign alone */
        "a=--1",               /* double sign */
        "a=\"unterminated",    /* string not closed */
        "a=\"bad\\escape\"",   /* only \" and \\ escapes */
        "a=\"tab\there\"",     /* control character */
        "a=\"caf\xc3\xa9\"",   /* non-ASCII */
        "a=:aGVsbG8=",         /* byte sequence not closed */
        "a=:aGV$bG8=:",        /* bad base64 character */
        "a=:a=GV:",            /* '=' inside */
        "a=:aGVsbG8===:",      /* too much padding */
        "a=:aGVsb:",           /* impossible length (4n+1) */
        "a=?2",                /* boolean */
        "a=?",                 /* boolean */
        "a=(1 2",              /* inner list not closed */
        "a=(1,2)",             /* comma in inner list */
        "a=(1)x",              /* junk after inner list */
        "a=((1))",             /* nested inner list */
        "a=1;",                /* empty parameter key */
        "a=1;P=1",             /* uppercase parameter key */
        "a=1;p=(1)",           /* inner list as parameter value */
        "a=@x",                /* not a bare item */
        "a=1 x",               /* trailing garbage */
        "\ta=1",               /* leading tab */
        "a=\"x\"\"y\"",        /* two strings */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mh_sf_dict_t d;
        const char *why = NULL;
        int rc = mh_sf_parse_dict(&A, bad[i], strlen(bad[i]), &d, &why);
        TAP_OK(rc == MH_EPARSE && why, "sf rejects %s (%s)", bad[i], why ? why : "-");
    }
    /* Bounds. */
    mh_buf_t b = {0};
    for (int i = 0; i < MH_SF_MAX_MEMBERS + 1; i++) mh_buf_printf(&b, "%sk%d=1", i ? "," : "", i);
    mh_sf_dict_t d;
    TAP_EQ_INT(mh_sf_parse_dict(&A, (const char *)b.p, b.len, &d, NULL), MH_ELIMIT, "sf member limit");
    b.len = 0;
    mh_buf_append_str(&b, "a=(");
    for (int i = 0; i < MH_SF_MAX_ITEMS + 1; i++) mh_buf_printf(&b, "%s%d", i ? " " : "", i);
    mh_buf_append_str(&b, ")");
    TAP_EQ_INT(mh_sf_parse_dict(&A, (const char *)b.p, b.len, &d, NULL), MH_ELIMIT, "sf inner list limit");
    b.len = 0;
    mh_buf_append_str(&b, "a=1");
    for (int i = 0; i < MH_SF_MAX_PARAMS + 1; i++) mh_buf_printf(&b, ";p%d", i);
    TAP_EQ_INT(mh_sf_parse_dict(&A, (const char *)b.p, b.len, &d, NULL), MH_ELIMIT, "sf parameter limit");
    /* Never reads past n: a valid prefix of a longer buffer. */
    TAP_EQ_INT(mh_sf_parse_dict(&A, "a=12345", 3, &d, NULL), 0, "sf honours the length");
    TAP_OK(d.n == 1 && d.m[0].item.v.i == 1, "sf parsed only the first 3 bytes");
    mh_buf_free(&b);
}

/* ---------------------------------------------------- RFC 9421 vectors */

static void test_rfc_bases(void)
{
    /* B.2.3: the signature base of a request covering @method @path @query. */
    mh_sf_dict_t d;
    TAP_EQ_INT(mh_sf_parse_dict(&A, b23_input, strlen(b23_input), &d, NULL), 0, "B.2.3 Signature-Input parses");
    mh_buf_t params = {0}, base = {0};
    TAP_EQ_INT(mh_sf_serialize_member(&params, &d.m[0]), 0, "B.2.3 params serialize");
    mh_sig_component_t c23[] = {
        {"date", S("Tue, 20 Apr 2021 02:07:55 GMT")},
        {"@method", S("POST")},
        {"@path", S("/foo")},
        {"@query", S("?param=Value&Pet=dog")},
        {"@authority", S("example.com")},
        {"content-type", S("application/json")},
        {"content-digest",
         S("sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:")},
        {"content-length", S("18")},
    };
    TAP_EQ_INT(mh_sig_base(&base, c23, 8, (mh_str_t){(const char *)params.p, params.len}), 0, "B.2.3 base builds");
    mh_buf_append_byte(&base, 0);
    TAP_EQ_STR((const char *)base.p, b23_base, "B.2.3 signature base matches the RFC");

    /* B.2.4: base, then the RFC's signature verifies with its key. */
    params.len = base.len = 0;
    TAP_EQ_INT(mh_sf_parse_dict(&A, b24_input, strlen(b24_input), &d, NULL), 0, "B.2.4 Signature-Input parses");
    mh_sf_serialize_member(&params, &d.m[0]);
    mh_sig_component_t c24[] = {
        {"@status", S("200")},
        {"content-type", S("application/json")},
        {"content-digest",
         S("sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ41QJgJc4GTsPp29l5oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:")},
        {"content-length", S("23")},
    };
    mh_sig_base(&base, c24, 4, (mh_str_t){(const char *)params.p, params.len});
    TAP_OK(base.len == strlen(b24_base) && !memcmp(base.p, b24_base, base.len), "B.2.4 signature base matches the RFC");

    mh_sf_dict_t ds;
    TAP_EQ_INT(mh_sf_parse_dict(&A, b24_sig, strlen(b24_sig), &ds, NULL), 0, "B.2.4 Signature parses");
    const mh_sf_member_t *sm = mh_sf_dict_get(&ds, "sig-b24");
    TAP_OK(sm && sm->item.v.t == MH_SF_BYTES && sm->item.v.s.n == 64, "B.2.4 signature is 64 bytes");

    uint8_t der[MH_SPKI_MAX];
    size_t dlen = 0;
    TAP_EQ_INT(mh_p256_spki(rfc_p256_pub, strlen(rfc_p256_pub), der, sizeof der, &dlen), 0, "RFC test key parses");
    TAP_EQ_INT(dlen, 91, "P-256 SPKI DER is 91 bytes");
    mh_id_t kid;
    mh_blob_id(der, dlen, &kid);
    TAP_EQ_STR(kid.s, rfc_p256_keyid, "key id = sha256 of DER SPKI (matches Python)");
    mh_p256_key_t *k = NULL;
    TAP_EQ_INT(mh_p256_key_new(der, dlen, &k), 0, "key loads");
    if (k && sm) {
        const uint8_t *sig = (const uint8_t *)sm->item.v.s.p;
        TAP_EQ_INT(mh_p256_verify(k, base.p, base.len, sig), 0, "B.2.4: the RFC's signature verifies");
        base.p[3] ^= 1;
        TAP_EQ_INT(mh_p256_verify(k, base.p, base.len, sig), MH_EAUTH, "B.2.4: a changed base does not verify");
        base.p[3] ^= 1;
        uint8_t bad[64];
        memcpy(bad, sig, 64);
        bad[63] ^= 0x40;
        TAP_EQ_INT(mh_p256_verify(k, base.p, base.len, bad), MH_EAUTH, "B.2.4: a changed signature does not verify");
        memset(bad, 0, 64);
        TAP_EQ_INT(mh_p256_verify(k, base.p, base.len, bad), MH_EAUTH, "r = s = 0 is rejected");
        memset(bad, 0xff, 64);
        TAP_EQ_INT(mh_p256_verify(k, base.p, base.len, bad), MH_EAUTH, "r, s >= n is rejected");
    }
    mh_p256_key_free(k);

    /* Second implementation: mbedTLS's own ECDSA agrees on the vector. */
    if (sm) {
        mbedtls_pk_context pk;
        mbedtls_pk_init(&pk);
        mbedtls_mpi r, s;
        mbedtls_mpi_init(&r);
        mbedtls_mpi_init(&s);
        uint8_t h[32];
        mh_sha256(base.p, base.len, h);
        int ok = mbedtls_pk_parse_public_key(&pk, der, dlen) == 0 &&
                 mbedtls_mpi_read_binary(&r, (const uint8_t *)sm->item.v.s.p, 32) == 0 &&
                 mbedtls_mpi_read_binary(&s, (const uint8_t *)sm->item.v.s.p + 32, 32) == 0 &&
                 mbedtls_ecdsa_verify(&mbedtls_pk_ec(pk)->grp, h, 32, &mbedtls_pk_ec(pk)->Q, &r, &s) == 0;
        TAP_OK(ok, "B.2.4: mbedtls_ecdsa_verify agrees");
        mbedtls_mpi_free(&r);
        mbedtls_mpi_free(&s);
        mbedtls_pk_free(&pk);
    }

    /* DER input gives the same canonical bytes. */
    uint8_t der2[MH_SPKI_MAX];
    size_t dlen2 = 0;
    TAP_OK(mh_p256_spki(der, dlen, der2, sizeof der2, &dlen2) == 0 && dlen2 == dlen && !memcmp(der, der2, dlen),
           "DER SPKI input round-trips");
    TAP_EQ_INT(mh_p256_spki("nonsense", 8, der2, sizeof der2, &dlen2), MH_EPARSE, "garbage is not a key");
    TAP_EQ_INT(mh_p256_spki(der, dlen, der2, 10, &dlen2), MH_ELIMIT, "small output buffer");
    static const char p384[] = "-----BEGIN PUBLIC KEY-----\n"
                               "MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEJioDGoveFxKW2mcoBuwfVrx9gtQbDJEU\n"
                               "C4Pw+EzauFhDlGQK9xFlrIjrMUY0n7WYkHspBlMJCcoYn4sUmATyuzVlIh6uP0kV\n"
                               "6Blqq2N4V3AQ1jPcf1YdAiDe0kgLeY7y\n"
                               "-----END PUBLIC KEY-----\n";
    TAP_EQ_INT(mh_p256_spki(p384, strlen(p384), der2, sizeof der2, &dlen2), MH_EPARSE, "a P-384 key is refused");
    TAP_EQ_INT(mh_p256_key_new((const uint8_t *)"\x30\x03\x02\x01\x01", 5, &k), MH_EPARSE,
               "a DER blob that is not a key is refused");
    mh_buf_free(&params);
    mh_buf_free(&base);
}

/* ------------------------------------------------------------- MSign */

static int verify_request(const char *method, const char *path, const char *query, const char *input,
                          const char *sigh, const char *digest, const char *body, int64_t now, const char **why)
{
    mh_msign_t m;
    int rc = mh_msign_parse(&A, S(input), S(sigh), &m, why);
    if (!rc) rc = mh_msign_check_time(&m, now, why);
    mh_str_t cd = digest ? S(digest) : (mh_str_t){NULL, 0};
    if (!rc) rc = mh_msign_check_body(&A, &m, cd, body, body ? strlen(body) : 0, why);
    if (rc) return rc;
    uint8_t der[MH_SPKI_MAX];
    size_t dlen;
    mh_p256_key_t *k = NULL;
    if (mh_p256_spki(rfc_p256_pub, strlen(rfc_p256_pub), der, sizeof der, &dlen) || mh_p256_key_new(der, dlen, &k))
        return MH_EPARSE;
    mh_buf_t base = {0};
    rc = mh_msign_base(&base, &m, S(method), S(path), S(query), cd);
    if (!rc) rc = mh_p256_verify(k, base.p, base.len, m.sig);
    if (rc && why) *why = "bad signature";
    mh_buf_free(&base);
    mh_p256_key_free(k);
    return rc;
}

static void test_msign_python(void)
{
    const char *why = NULL;
    int rc = verify_request("POST", "/gabriel/my-repo/fetch", "x=1&y=%20", py_input_body, py_sig_body, py_digest,
                            py_body, 1700000100, &why);
    TAP_OK(rc == 0, "msign.py POST with body verifies (%s)", why ? why : "ok");
    rc = verify_request("GET", "/gabriel/my-repo/refs", "", py_input_get, py_sig_get, NULL, NULL, 1700000000, &why);
    TAP_OK(rc == 0, "msign.py GET without body verifies (%s)", why ? why : "ok");

    /* Tampering with anything covered breaks it. */
    TAP_EQ_INT(verify_request("PUT", "/gabriel/my-repo/fetch", "x=1&y=%20", py_input_body, py_sig_body, py_digest,
                              py_body, 1700000000, NULL),
               MH_EAUTH, "other method: 401");
    TAP_EQ_INT(verify_request("POST", "/gabriel/other/fetch", "x=1&y=%20", py_input_body, py_sig_body, py_digest,
                              py_body, 1700000000, NULL),
               MH_EAUTH, "other path: 401");
    TAP_EQ_INT(verify_request("POST", "/gabriel/my-repo/fetch", "x=1&y=+", py_input_body, py_sig_body, py_digest,
                              py_body, 1700000000, NULL),
               MH_EAUTH, "other query (same decoded meaning): 401");
    TAP_EQ_INT(verify_request("POST", "/gabriel/my-repo/fetch", "x=1&y=%20", py_input_body, py_sig_body, py_digest,
                              "{\"want\":[\"y\"]}", 1700000000, NULL),
               MH_EAUTH, "other body: 401 (digest)");
    TAP_EQ_INT(verify_request("GET", "/gabriel/my-repo/refs", "", py_input_get, py_sig_get, NULL, NULL,
                              1700000000 + 301, NULL),
               MH_EAUTH, "stale created: 401");
    TAP_EQ_INT(verify_request("GET", "/gabriel/my-repo/refs", "", py_input_get, py_sig_get, NULL, NULL,
                              1700000000 - 301, NULL),
               MH_EAUTH, "created in the future: 401");
    TAP_EQ_INT(verify_request("GET", "/gabriel/my-repo/refs", "", py_input_get, py_sig_get, NULL, NULL,
                              1700000000 + 300, NULL),
               0, "created 300 s ago is accepted");
    TAP_EQ_INT(verify_request("GET", "/gabriel/my-repo/refs", "", py_input_get, py_sig_get, NULL, "x", 1700000000,
                              NULL),
               MH_EAUTH, "a body the signature does not cover: 401");

    /* Insignificant spacing in Signature-Input is re-serialized away. */
    static const char spaced[] =
        "msign=(  \"@method\"   \"@path\" \"@query\" );created=1700000000;"
        "keyid=\"sha256:55f96361b78cbb84f1fc604b0718e82bd91abb46d8fc25ae871b35fbbf8b7974\";alg=\"ecdsa-p256-sha256\"";
    TAP_EQ_INT(verify_request("GET", "/gabriel/my-repo/refs", "", spaced, py_sig_get, NULL, NULL, 1700000000, NULL),
               0, "spacing inside the inner list does not matter");

    /* The base itself. */
    mh_msign_t m;
    mh_msign_parse(&A, S(py_input_get), S(py_sig_get), &m, NULL);
    mh_buf_t base = {0};
    mh_msign_base(&base, &m, S("GET"), S(""), S(""), (mh_str_t){NULL, 0});
    mh_buf_append_byte(&base, 0);
    TAP_EQ_STR((const char *)base.p,
               "\"@method\": GET\n\"@path\": /\n\"@query\": ?\n\"@signature-params\": (\"@method\" \"@path\" "
               "\"@query\");created=1700000000;keyid=\"sha256:55f96361b78cbb84f1fc604b0718e82bd91abb46d8fc25ae871b35"
               "fbbf8b7974\";alg=\"ecdsa-p256-sha256\"",
               "base: empty path is '/', empty query is '?'");
    mh_buf_free(&base);
}

static void test_msign_strict(void)
{
    static const char kid[] = "sha256:55f96361b78cbb84f1fc604b0718e82bd91abb46d8fc25ae871b35fbbf8b7974";
    char good_sig[] = "msign=:DajJtY9cwYV4xsZiakLF0ERnCoUp2lyFvR1x0YpJZvJSXMNuXCg4gp84d6neCUweke3nSFhuD1aU8/HGoOA3YQ==:";
    static const struct {
        const char *input, *sig, *what;
    } bad[] = {
        {"sig1=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", NULL, "label"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\", x=1", NULL,
         "extra member"},
        {"msign=(\"@path\" \"@method\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", NULL, "order"},
        {"msign=(\"@method\" \"@path\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", NULL, "too few"},
        {"msign=(\"@method\" \"@path\" \"@query\" \"content-digest\" \"date\");created=1;keyid=\"%s\";"
         "alg=\"ecdsa-p256-sha256\"",
         NULL, "too many"},
        {"msign=(\"@method\" \"@path\" \"@query\" \"content-type\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"",
         NULL, "wrong fourth"},
        {"msign=(\"@method\" \"@path\" \"@query\";req);created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", NULL,
         "item parameter"},
        {"msign=(@method \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", NULL,
         "token not string"},
        {"msign=(\"@method\" \"@path\" \"@query\");keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", NULL, "no created"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=\"1\";keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", NULL,
         "created string"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1.5;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", NULL,
         "created decimal"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;alg=\"ecdsa-p256-sha256\"", NULL, "no keyid"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"test-key-ecc-p256\";alg=\"ecdsa-p256-sha256\"",
         NULL, "keyid not an id"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=%s;alg=\"ecdsa-p256-sha256\"", NULL,
         "keyid token"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\"", NULL, "no alg"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"rsa-pss-sha512\"", NULL, "other alg"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\";foo=1", NULL,
         "unknown param"},
        {"msign=\"@method\";created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", NULL, "not an inner list"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", "msign=:AAAA:",
         "short signature"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"",
         "msign=(\"x\")", "signature not bytes"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"",
         "other=:DajJtY9cwYV4xsZiakLF0ERnCoUp2lyFvR1x0YpJZvJSXMNuXCg4gp84d6neCUweke3nSFhuD1aU8/HGoOA3YQ==:",
         "signature label"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"",
         "msign=:DajJtY9cwYV4xsZiakLF0ERnCoUp2lyFvR1x0YpJZvJSXMNuXCg4gp84d6neCUweke3nSFhuD1aU8/HGoOA3YQ==:;x=1",
         "signature parameter"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", "msign=:Da jJ:",
         "signature malformed"},
        {"msign=(\"@method\" \"@path\" \"@query\")created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", NULL,
         "malformed input"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\", "
         "msign=(\"@method\" \"@path\" \"@query\");created=2;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"",
         NULL, "label twice in Signature-Input"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"",
         "msign=:AAAA:, msign=:DajJtY9cwYV4xsZiakLF0ERnCoUp2lyFvR1x0YpJZvJSXMNuXCg4gp84d6neCUweke3nSFhuD1aU8/HGoOA3YQ==:", "label twice in Signature"},
        {"msign=(\"@method\" \"@path\" \"@query\");created=1;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"",
         "msign=:DajJtY9cwYV4xsZiakLF0ERnCoUp2lyFvR1x0YpJZvKtozyQo9fHfmDHiFYh9rPhKvkTZU6pjy5exdj8W4Lt8A==:", "high-S signature"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char in[512];
        snprintf(in, sizeof in, bad[i].input, kid, kid);
        mh_msign_t m;
        const char *why = NULL;
        int rc = mh_msign_parse(&A, S(in), S(bad[i].sig ? bad[i].sig : good_sig), &m, &why);
        TAP_OK(rc == MH_EAUTH && why, "msign rejects: %s (%s)", bad[i].what, why ? why : "-");
    }
    mh_msign_t m;
    const char *why = NULL;
    TAP_EQ_INT(mh_msign_parse(&A, S(py_input_get), (mh_str_t){NULL, 0}, &m, &why), MH_EAUTH,
               "Signature-Input without Signature");
    TAP_EQ_INT(mh_msign_parse(&A, (mh_str_t){NULL, 0}, S(good_sig), &m, &why), MH_EAUTH,
               "Signature without Signature-Input");

    /* Optional parameters that are allowed. */
    char in[512];
    snprintf(in, sizeof in,
             "msign=(\"@method\" \"@path\" \"@query\");created=100;expires=200;nonce=\"n\";tag=\"t\";keyid=\"%s\";"
             "alg=\"ecdsa-p256-sha256\"",
             kid);
    TAP_EQ_INT(mh_msign_parse(&A, S(in), S(good_sig), &m, &why), 0, "expires, nonce and tag are accepted");
    TAP_EQ_INT(mh_msign_check_time(&m, 150, &why), 0, "before expires");
    TAP_EQ_INT(mh_msign_check_time(&m, 201, &why), MH_EAUTH, "after expires");
    TAP_OK(strstr(m.params, "expires=200;nonce=\"n\";tag=\"t\"") != NULL, "params keep every parameter in order");

    /* Body rules. */
    TAP_EQ_INT(mh_msign_parse(&A, S(py_input_body), S(py_sig_body), &m, &why), 0, "body signature parses");
    TAP_EQ_INT(mh_msign_check_body(&A, &m, S(py_digest), "", 0, &why), MH_EAUTH,
               "content-digest covered on an empty body");
    TAP_EQ_INT(mh_msign_check_body(&A, &m, (mh_str_t){NULL, 0}, py_body, strlen(py_body), &why), MH_EAUTH,
               "Content-Digest missing");
    TAP_EQ_INT(mh_msign_check_body(&A, &m, S("sha-512=:AAAA:"), py_body, strlen(py_body), &why), MH_EAUTH,
               "no sha-256 member");
    TAP_EQ_INT(mh_msign_check_body(&A, &m, S("sha-256=:AAAA:"), py_body, strlen(py_body), &why), MH_EAUTH,
               "sha-256 of the wrong length");
    TAP_EQ_INT(mh_msign_check_body(&A, &m, S("sha-256=onm1"), py_body, strlen(py_body), &why), MH_EAUTH,
               "sha-256 not a byte sequence");
    TAP_EQ_INT(mh_msign_check_body(&A, &m, S("sha-256=:onm1++yQpnSBzSwI/wBivHu0kuw+lae9SaHz2hUB9Uw=:, sha-512=:AA==:"),
                                   py_body, strlen(py_body), &why),
               0, "other digest algorithms are ignored");
    TAP_EQ_INT(mh_msign_check_body(&A, &m, S("sha-256=:onm1++yQpnSBzSwI/wBivHu0kuw+lae9SaHz2hUB9Uw=:,"), py_body,
                                   strlen(py_body), &why),
               MH_EAUTH, "malformed Content-Digest");
    TAP_EQ_INT(mh_msign_check_body(&A, &m,
                                   S("sha-256=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:, "
                                     "sha-256=:onm1++yQpnSBzSwI/wBivHu0kuw+lae9SaHz2hUB9Uw=:"),
                                   py_body, strlen(py_body), &why),
               MH_EAUTH, "sha-256 twice in Content-Digest (a reader of the first would see another body)");

    /* High-S (issue 15 item 5): (r, n - s) verifies with libcrypto, the
     * parse refuses it; the low-S half of the same signature is accepted. */
    {
        mh_msign_t mh;
        TAP_EQ_INT(mh_msign_parse(&A, S(py_input_get), S(py_sig_get_high), &mh, &why), MH_EAUTH,
                   "high-S msign.py signature refused at parse");
        TAP_OK(why && strstr(why, "high-S"), "reason says high-S (%s)", why ? why : "-");
        TAP_EQ_INT(mh_msign_parse(&A, S(py_input_get), S(py_sig_get), &mh, &why), 0, "its low-S half parses");
        TAP_OK(mh_msign_high_s(mh.sig) == false, "mh_msign_high_s: low half");
        uint8_t edge[64] = {0};
        static const uint8_t half[32] = {0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff,
                                         0xff, 0xff, 0xff, 0xff, 0xff, 0xde, 0x73, 0x7d, 0x56, 0xd3, 0x8b,
                                         0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8};
        memcpy(edge + 32, half, 32);
        TAP_OK(!mh_msign_high_s(edge), "s = floor(n/2) is low");
        edge[63]++;
        TAP_OK(mh_msign_high_s(edge), "s = floor(n/2) + 1 is high");
    }

    /* Components with line breaks cannot enter a base. */
    mh_buf_t b = {0};
    mh_sig_component_t c = {"@path", S("/a\nb")};
    TAP_EQ_INT(mh_sig_base(&b, &c, 1, S("()")), MH_EINVAL, "line break in a component");
    mh_buf_free(&b);
}

/* -------------------------------------------------------- rate limits */

static void test_ratelimit(void)
{
    mh_ratelimit_t *rl = mh_ratelimit_new(3, 0);
    uint64_t t = 1000000;
    TAP_EQ_INT(mh_ratelimit_take(rl, "a", t), 0, "token 1");
    TAP_EQ_INT(mh_ratelimit_take(rl, "a", t), 0, "token 2");
    TAP_EQ_INT(mh_ratelimit_take(rl, "a", t), 0, "token 3");
    uint32_t w = mh_ratelimit_take(rl, "a", t);
    TAP_EQ_INT(w, 20, "burst exhausted: retry after 20 s (3 per minute)");
    TAP_EQ_INT(mh_ratelimit_take(rl, "b", t), 0, "another key has its own bucket");
    TAP_OK(mh_ratelimit_take(rl, "a", t + 10000) == 10, "half refilled: 10 s left");
    TAP_EQ_INT(mh_ratelimit_take(rl, "a", t + 20000), 0, "refilled one token after 20 s");
    TAP_OK(mh_ratelimit_take(rl, "a", t + 20000) > 0, "and only one");
    TAP_EQ_INT(mh_ratelimit_take(rl, "a", t + 600000), 0, "full again much later");
    mh_ratelimit_free(rl);

    rl = mh_ratelimit_new(0, 0);
    int denied = 0;
    for (int i = 0; i < 10000; i++) denied += mh_ratelimit_take(rl, "a", t) != 0;
    TAP_EQ_INT(denied, 0, "rate 0 disables the limit");
    mh_ratelimit_free(rl);

    /* Many keys: bounded memory, and busy buckets survive sweeps. */
    rl = mh_ratelimit_new(2, 1000);
    mh_ratelimit_take(rl, "busy", t);
    mh_ratelimit_take(rl, "busy", t);
    char k[32];
    for (int i = 0; i < 5000; i++) {
        snprintf(k, sizeof k, "10.0.%d.%d", i / 256, i % 256);
        mh_ratelimit_take(rl, k, t + 60000 + (uint64_t)i * 100);
    }
    TAP_OK(1, "5000 distinct keys with max 1000 did not crash");
    mh_ratelimit_free(rl);
}

static void test_handles(void)
{
    TAP_OK(mh_handle_valid("gabriel", 7), "handle gabriel");
    TAP_OK(mh_handle_valid("A.b_c-9", 7), "handle with . _ -");
    TAP_OK(!mh_handle_valid("", 0), "empty handle");
    TAP_OK(!mh_handle_valid("-x", 2), "leading dash");
    TAP_OK(!mh_handle_valid("_store", 6), "leading underscore");
    TAP_OK(!mh_handle_valid("a/b", 3), "slash");
    TAP_OK(!mh_handle_valid("a b", 3), "space");
    TAP_OK(!mh_handle_valid("api", 3), "reserved api");
    TAP_OK(mh_handle_valid("apis", 4), "apis is fine");
    char long_h[66];
    memset(long_h, 'a', 65);
    TAP_OK(mh_handle_valid(long_h, 64) && !mh_handle_valid(long_h, 65), "64 bytes at most");
}

static void test_perm(void)
{
    mh_caller_t owner = {.anonymous = false, .handle = "o"};
    mh_identity_id("o", 1, &owner.identity_id);
    mh_caller_t other = {.anonymous = false, .handle = "x"};
    mh_identity_id("x", 1, &other.identity_id);
    mh_caller_t admin = other;
    admin.is_admin = true;
    const char *oid = owner.identity_id.s;
    TAP_EQ_INT(mh_auth_perm(&owner, oid, false, NULL), MH_PERM_ADMIN, "owner: admin");
    TAP_EQ_INT(mh_auth_perm(&admin, oid, false, NULL), MH_PERM_ADMIN, "site admin: admin");
    TAP_EQ_INT(mh_auth_perm(&other, oid, false, NULL), MH_PERM_NONE, "stranger, private: none");
    TAP_EQ_INT(mh_auth_perm(&other, oid, true, NULL), MH_PERM_READ, "stranger, public: read");
    TAP_EQ_INT(mh_auth_perm(&other, oid, false, "read"), MH_PERM_READ, "collaborator read");
    TAP_EQ_INT(mh_auth_perm(&other, oid, false, "write"), MH_PERM_WRITE, "collaborator write");
    TAP_EQ_INT(mh_auth_perm(&other, oid, false, "admin"), MH_PERM_ADMIN, "collaborator admin");
    TAP_EQ_INT(mh_auth_perm(mh_caller_anonymous(), oid, false, NULL), MH_PERM_NONE, "anonymous, private: none");
    TAP_EQ_INT(mh_auth_perm(mh_caller_anonymous(), oid, true, "admin"), MH_PERM_READ,
               "anonymous, public: read only");
}

int main(void)
{
    mh_arena_init(&A, 0);
    test_sf_valid();
    test_sf_values();
    test_sf_malformed();
    test_rfc_bases();
    test_msign_python();
    test_msign_strict();
    test_ratelimit();
    test_handles();
    test_perm();
    mh_arena_release(&A);
    return tap_done();
}
