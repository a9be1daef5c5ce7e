/*
 * msign.c — MSign (SPEC 5): the strict reading of Signature-Input,
 * Signature and Content-Digest, the RFC 9421 signature base, P-256 public
 * keys (parsed and canonicalised with mbedTLS, like `musehubd identity
 * add`) and ecdsa-p256-sha256 verification (libcrypto: see below).
 *
 * Invariants:
 *  - Nothing here touches the network, the database or the clock: callers
 *    pass `now`, so every rule is unit-testable with fixed inputs.
 *  - The signature base is rebuilt from the request as received and from
 *    the canonical re-serialization of the parsed Signature-Input member
 *    (RFC 9421 2.3/2.5): a verifier never signs-over text it did not parse.
 *  - Every rejection carries a static reason for the log; the client only
 *    ever sees a bare 401 (SPEC 5).
 */
#include <mbedtls/pk.h>
#include <openssl/bn.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <stdlib.h>
#include <string.h>

#include "mh/auth.h"

static int deny(const char **why, const char *reason)
{
    if (why) *why = reason;
    return MH_EAUTH;
}

static int oom(const char **why)
{
    if (why) *why = "out of memory";
    return MH_ENOMEM;
}

/* floor(n / 2) for the P-256 group order n, big-endian. */
static const uint8_t p256_half_n[32] = {0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff,
                                        0xff, 0xff, 0xff, 0xff, 0xff, 0xde, 0x73, 0x7d, 0x56, 0xd3, 0x8b,
                                        0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8};

bool mh_msign_high_s(const uint8_t sig[64]) { return memcmp(sig + 32, p256_half_n, 32) > 0; }

/* The two covered-component lists SPEC 5 allows, in order. */
static const char *const covered_full[] = {"@method", "@path", "@query", "content-digest"};

/* Exactly one member, labelled msign, written once: RFC 8941 folds
 * "msign=a, msign=b" into b, and a reader that took a would see another
 * signature (docs/auth.md: a second signature is refused, not ignored). */
static const mh_sf_member_t *only_msign(const mh_sf_dict_t *d)
{
    if (d->n != 1 || d->nparsed != 1) return NULL;
    return mh_sf_dict_get(d, MH_MSIGN_LABEL);
}

static int check_input_params(const mh_sf_member_t *m, mh_msign_t *out, const char **why)
{
    bool have_created = false, have_keyid = false, have_alg = false;
    for (uint32_t i = 0; i < m->params.n; i++) {
        const mh_sf_param_t *p = &m->params.p[i];
        const mh_sf_bare_t *v = &p->v;
        if (mh_str_eq(p->key, "created")) {
            if (v->t != MH_SF_INT || v->i <= 0) return deny(why, "created is not a positive integer");
            out->created = v->i;
            have_created = true;
        } else if (mh_str_eq(p->key, "expires")) {
            if (v->t != MH_SF_INT || v->i <= 0) return deny(why, "expires is not a positive integer");
            out->expires = v->i;
        } else if (mh_str_eq(p->key, "keyid")) {
            if (v->t != MH_SF_STR || !mh_id_valid(v->s.p, v->s.n)) return deny(why, "keyid is not a key id");
            memcpy(out->keyid, v->s.p, MH_ID_LEN);
            out->keyid[MH_ID_LEN] = 0;
            have_keyid = true;
        } else if (mh_str_eq(p->key, "alg")) {
            if (v->t != MH_SF_STR || !mh_str_eq(v->s, MH_MSIGN_ALG)) return deny(why, "alg is not ecdsa-p256-sha256");
            have_alg = true;
        } else if (mh_str_eq(p->key, "nonce") || mh_str_eq(p->key, "tag")) {
            if (v->t != MH_SF_STR) return deny(why, "nonce/tag is not a string");
        } else {
            return deny(why, "unknown signature parameter");
        }
    }
    if (!have_created) return deny(why, "created is missing");
    if (!have_keyid) return deny(why, "keyid is missing");
    if (!have_alg) return deny(why, "alg is missing");
    return 0;
}

static int check_covered(const mh_sf_member_t *m, mh_msign_t *out, const char **why)
{
    if (!m->inner) return deny(why, "Signature-Input member is not an inner list");
    if (m->nitems != 3 && m->nitems != 4) return deny(why, "covered components are not the MSign set");
    for (uint32_t i = 0; i < m->nitems; i++) {
        const mh_sf_item_t *it = &m->items[i];
        if (it->v.t != MH_SF_STR || it->params.n) return deny(why, "covered component is not a plain string");
        if (!mh_str_eq(it->v.s, covered_full[i])) return deny(why, "covered components are not the MSign set");
    }
    out->covers_digest = m->nitems == 4;
    return 0;
}

int mh_msign_parse(mh_arena_t *a, mh_str_t sig_input, mh_str_t signature, mh_msign_t *out, const char **why)
{
    memset(out, 0, sizeof *out);
    if (!sig_input.p || !signature.p) return deny(why, "Signature and Signature-Input must come together");
    mh_sf_dict_t di, ds;
    const char *pwhy = NULL;
    int rc = mh_sf_parse_dict(a, sig_input.p, sig_input.n, &di, &pwhy);
    if (!rc) rc = mh_sf_parse_dict(a, signature.p, signature.n, &ds, &pwhy);
    if (rc == MH_ENOMEM) return oom(why);
    if (rc) return deny(why, "Signature or Signature-Input is not a structured-field dictionary");

    const mh_sf_member_t *mi = only_msign(&di), *ms = only_msign(&ds);
    if (!mi) return deny(why, "Signature-Input must hold exactly the label msign");
    if (!ms) return deny(why, "Signature must hold exactly the label msign");
    if ((rc = check_covered(mi, out, why)) || (rc = check_input_params(mi, out, why))) return rc;
    if (ms->inner || ms->item.v.t != MH_SF_BYTES || ms->item.params.n)
        return deny(why, "Signature member is not a plain byte sequence");
    if (ms->item.v.s.n != 64) return deny(why, "signature is not 64 bytes (r||s)");
    memcpy(out->sig, ms->item.v.s.p, 64);
    /* (r, s) and (r, n - s) both verify: anyone can turn one valid
     * signature into another without the key. Only the low-S form is
     * accepted (SPEC 5), so one request has one signature. */
    if (mh_msign_high_s(out->sig)) return deny(why, "signature has s > n/2 (high-S)");

    /* @signature-params: the member re-serialized canonically (RFC 9421
     * 2.3), so insignificant spacing in the header cannot matter. */
    mh_buf_t b = {0};
    char *params = mh_sf_serialize_member(&b, mi) ? NULL : mh_strndup(a, (const char *)b.p, b.len);
    out->params_len = b.len;
    mh_buf_free(&b);
    if (!params) return oom(why);
    out->params = params;
    return 0;
}

int mh_msign_check_time(const mh_msign_t *m, int64_t now, const char **why)
{
    int64_t d = now - m->created;
    if (d > MH_MSIGN_MAX_SKEW) return deny(why, "created is too old");
    if (d < -MH_MSIGN_MAX_SKEW) return deny(why, "created is in the future");
    if (m->expires && now > m->expires) return deny(why, "the signature has expired");
    return 0;
}

int mh_msign_check_body(mh_arena_t *a, const mh_msign_t *m, mh_str_t content_digest, const void *body, size_t n,
                        const char **why)
{
    if (n == 0) {
        /* SPEC 5: a request without a body (an empty POST included) covers
         * exactly @method @path @query. */
        if (m->covers_digest) return deny(why, "content-digest covered but the body is empty");
        return 0;
    }
    if (!m->covers_digest) return deny(why, "a request with a body must cover content-digest");
    if (!content_digest.p) return deny(why, "Content-Digest is missing");
    mh_sf_dict_t d;
    const char *pwhy = NULL;
    int rc = mh_sf_parse_dict(a, content_digest.p, content_digest.n, &d, &pwhy);
    if (rc == MH_ENOMEM) return oom(why);
    if (rc) return deny(why, "Content-Digest is not a structured-field dictionary");
    if (d.nparsed != d.n) return deny(why, "Content-Digest names an algorithm twice");
    const mh_sf_member_t *md = mh_sf_dict_get(&d, "sha-256");
    if (!md || md->inner || md->item.v.t != MH_SF_BYTES || md->item.params.n || md->item.v.s.n != 32)
        return deny(why, "Content-Digest has no sha-256 byte sequence of 32 bytes");
    uint8_t h[32];
    mh_sha256(body, n, h);
    if (!mh_ct_equal(h, md->item.v.s.p, 32)) return deny(why, "Content-Digest does not match the body");
    return 0;
}

int mh_sig_base(mh_buf_t *out, const mh_sig_component_t *c, size_t n, mh_str_t params)
{
    for (size_t i = 0; i < n; i++) {
        if (memchr(c[i].value.p, '\n', c[i].value.n) || memchr(c[i].value.p, '\r', c[i].value.n)) return MH_EINVAL;
        if (mh_buf_append_byte(out, '"') || mh_buf_append_str(out, c[i].name) || mh_buf_append(out, "\": ", 3) ||
            mh_buf_append(out, c[i].value.p, c[i].value.n) || mh_buf_append_byte(out, '\n'))
            return MH_ENOMEM;
    }
    if (mh_buf_append_str(out, "\"@signature-params\": ") || mh_buf_append(out, params.p, params.n)) return MH_ENOMEM;
    return 0;
}

int mh_msign_base(mh_buf_t *out, const mh_msign_t *m, mh_str_t method, mh_str_t path, mh_str_t query,
                  mh_str_t content_digest)
{
    /* RFC 9421 2.2.7: "?" + query, or "?" alone when there is none. The
     * query needs its own buffer only to prepend the '?'. */
    char qbuf[512];
    mh_buf_t qheap = {0};
    mh_str_t q;
    if (query.n + 1 <= sizeof qbuf) {
        qbuf[0] = '?';
        if (query.n) memcpy(qbuf + 1, query.p, query.n);
        q = (mh_str_t){qbuf, query.n + 1};
    } else {
        if (mh_buf_append_byte(&qheap, '?') || mh_buf_append(&qheap, query.p, query.n)) {
            mh_buf_free(&qheap);
            return MH_ENOMEM;
        }
        q = (mh_str_t){(const char *)qheap.p, qheap.len};
    }
    mh_sig_component_t c[4] = {
        {"@method", method},
        {"@path", path.n ? path : MH_STR("/")},
        {"@query", q},
        {"content-digest", content_digest.p ? content_digest : MH_STR("")},
    };
    int rc = mh_sig_base(out, c, m->covers_digest ? 4 : 3, (mh_str_t){m->params, m->params_len});
    mh_buf_free(&qheap);
    return rc;
}

/* ------------------------------------------------------- P-256 keys */

/* Parses PEM (needs a NUL-terminated copy, length including the NUL) or
 * DER into pk and checks the key is ECDSA-capable P-256. */
static int parse_p256(mbedtls_pk_context *pk, const void *in, size_t n)
{
    const char *s = in;
    int rc;
    if (n >= 10 && !memcmp(s, "-----BEGIN", 10)) {
        char *z = malloc(n + 1);
        if (!z) return MH_ENOMEM;
        memcpy(z, s, n);
        z[n] = 0;
        rc = mbedtls_pk_parse_public_key(pk, (const unsigned char *)z, n + 1);
        free(z);
    } else {
        rc = mbedtls_pk_parse_public_key(pk, in, n);
    }
    if (rc) return MH_EPARSE;
    if (mbedtls_pk_get_type(pk) != MBEDTLS_PK_ECKEY) return MH_EPARSE;
    if (mbedtls_pk_ec(*pk)->grp.id != MBEDTLS_ECP_DP_SECP256R1) return MH_EPARSE;
    return 0;
}

int mh_p256_spki(const void *in, size_t n, uint8_t *der, size_t cap, size_t *der_len)
{
    mbedtls_pk_context pk;
    mbedtls_pk_init(&pk);
    int rc = parse_p256(&pk, in, n);
    if (!rc) {
        unsigned char tmp[MH_SPKI_MAX];
        int w = mbedtls_pk_write_pubkey_der(&pk, tmp, sizeof tmp); /* written at the end of tmp */
        if (w <= 0) rc = MH_EPARSE;
        else if ((size_t)w > cap) rc = MH_ELIMIT;
        else {
            memcpy(der, tmp + sizeof tmp - (size_t)w, (size_t)w);
            *der_len = (size_t)w;
        }
    }
    mbedtls_pk_free(&pk);
    return rc;
}

/* Verification uses OpenSSL libcrypto, not mbedTLS: measured here,
 * mbedtls_ecdsa_verify takes about 2.2 ms per P-256 signature against
 * about 0.06 ms for libcrypto (already linked for bulk SHA-256, see
 * ENVIRONMENT.md), and it runs on the loop thread for every signed
 * request. test_msign cross-checks the two libraries on the RFC vector. */
struct mh_p256_key {
    EVP_PKEY *pkey;
};

int mh_p256_key_new(const uint8_t *der, size_t n, mh_p256_key_t **out)
{
    const unsigned char *p = der;
    EVP_PKEY *pk = d2i_PUBKEY(NULL, &p, (long)n);
    char group[32] = "";
    size_t glen = 0;
    if (!pk || p != der + n || EVP_PKEY_get_base_id(pk) != EVP_PKEY_EC ||
        !EVP_PKEY_get_group_name(pk, group, sizeof group, &glen) || strcmp(group, "prime256v1") != 0) {
        EVP_PKEY_free(pk);
        ERR_clear_error();
        return MH_EPARSE;
    }
    mh_p256_key_t *k = malloc(sizeof *k);
    if (!k) {
        EVP_PKEY_free(pk);
        return MH_ENOMEM;
    }
    k->pkey = pk;
    *out = k;
    return 0;
}

void mh_p256_key_free(mh_p256_key_t *k)
{
    if (!k) return;
    EVP_PKEY_free(k->pkey);
    free(k);
}

int mh_p256_verify(mh_p256_key_t *k, const void *msg, size_t n, const uint8_t sig[64])
{
    /* RFC 9421 3.3.4: the signature is raw r||s; libcrypto wants the DER
     * ECDSA-Sig-Value, so re-encode (r, s >= n or zero fail below). */
    unsigned char der[80], *dp = der;
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig, 32, NULL), *s = BN_bin2bn(sig + 32, 32, NULL);
    int rc = MH_EAUTH, dlen = 0;
    if (es && r && s && ECDSA_SIG_set0(es, r, s)) {
        r = s = NULL; /* owned by es now */
        dlen = i2d_ECDSA_SIG(es, &dp);
    }
    EVP_MD_CTX *ctx = dlen > 0 ? EVP_MD_CTX_new() : NULL;
    if (ctx && EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, k->pkey) == 1 &&
        EVP_DigestVerify(ctx, der, (size_t)dlen, msg, n) == 1)
        rc = 0;
    EVP_MD_CTX_free(ctx);
    ECDSA_SIG_free(es);
    BN_free(r);
    BN_free(s);
    ERR_clear_error();
    return rc;
}
