/*
 * sigv4.h — private to src/store/: AWS Signature Version 4 for S3 (header
 * signing and presigned query signing), RFC 3986 URI encoding as SigV4
 * wants it, and a tiny bounded scanner of S3 XML error bodies. Pure
 * functions over memory: no network, no clock (the caller passes the
 * time), so the AWS published examples are their unit tests.
 *
 * References: AWS "Signature Version 4 signing process" and "Authenticating
 * Requests: Using Query Parameters (AWS Signature Version 4)" for S3.
 *
 * Invariants:
 *  - Names and values are passed unencoded; this module encodes them once
 *    (S3 does not double-encode paths and does not normalise them).
 *  - Header names are lowercased and values trimmed (runs of spaces become
 *    one) before signing; the caller must send the same values.
 *  - A signing key is derived at most once per (UTC date, credentials)
 *    and cached in mh_sigv4_cred_t; the struct is not thread-safe (the
 *    store uses it on the loop thread only).
 */
#ifndef MH_SIGV4_H
#define MH_SIGV4_H

#include "mh/core.h"

/* The payload hash of presigned requests (the body is not known). */
#define MH_SIGV4_UNSIGNED_PAYLOAD "UNSIGNED-PAYLOAD"
/* SHA-256 of the empty string, the payload hash of GET/HEAD/DELETE. */
#define MH_SIGV4_EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
/* At most this many headers and query parameters per request. */
#define MH_SIGV4_MAX_KV 24
/* Longest presigned expiry S3 accepts (7 days, seconds). */
#define MH_SIGV4_MAX_EXPIRES 604800u

/* One header or query parameter, unencoded, NUL-terminated. */
typedef struct {
    const char *name, *value;
} mh_sigv4_kv_t;

/* Credentials and scope. Set the four strings; zero the cache fields
 * (e.g. with a designated initialiser) before first use. */
typedef struct {
    const char *access_key, *secret_key;
    const char *region;  /* "us-east-1" */
    const char *service; /* "s3" */
    /* cache: the signing key of key_date (YYYYMMDD); filled on demand */
    char key_date[9];
    uint8_t key[32];
} mh_sigv4_cred_t;

/* One request to sign. */
typedef struct {
    const char *method;           /* "GET", "PUT", "HEAD", "DELETE" */
    const char *path;             /* unencoded absolute path: "/bucket/key" (path style) or "/key" */
    const mh_sigv4_kv_t *query;   /* unencoded query parameters (names unique), or NULL */
    size_t nquery;                /* <= MH_SIGV4_MAX_KV (minus 6 for presign) */
    const mh_sigv4_kv_t *headers; /* headers to sign, any case and order; must include host */
    size_t nheaders;              /* 1..MH_SIGV4_MAX_KV */
    const char *payload_hash;     /* lowercase hex SHA-256 of the body, or MH_SIGV4_UNSIGNED_PAYLOAD */
    const char *amz_date;         /* "YYYYMMDDTHHMMSSZ" (16 chars), the x-amz-date value */
} mh_sigv4_req_t;

/* Appends s[0..n) URI-encoded to out: every byte outside the RFC 3986
 * unreserved set A-Z a-z 0-9 - . _ ~ becomes %XX (upper-case hex); '/'
 * is kept when keep_slash (paths) and encoded otherwise (query names and
 * values, x-amz-copy-source keys use keep_slash). MH_ENOMEM. */
int mh_sigv4_uri_encode(mh_buf_t *out, const char *s, size_t n, bool keep_slash);

/* Writes x-amz-date for unix time t: "YYYYMMDDTHHMMSSZ" + NUL. */
void mh_sigv4_amz_date(int64_t t, char out[17]);

/* Appends the canonical request (six lines joined with '\n': method,
 * encoded path, sorted encoded query, canonical headers, signed header
 * list, payload hash) to out. MH_EINVAL (bad request: missing field, too
 * many or duplicate headers, no host header), MH_ENOMEM. */
int mh_sigv4_canonical_request(const mh_sigv4_req_t *r, mh_buf_t *out);

/* Appends the string to sign ("AWS4-HMAC-SHA256\n<date>\n<scope>\n<hex
 * sha256 of the canonical request>") to out. Errors as above. */
int mh_sigv4_string_to_sign(const mh_sigv4_cred_t *c, const mh_sigv4_req_t *r, mh_buf_t *out);

/* Derives the signing key HMAC(HMAC(HMAC(HMAC("AWS4"+secret, date8),
 * region), service), "aws4_request"). secret, region and service are
 * NUL-terminated; date8 is the 8 characters YYYYMMDD. */
void mh_sigv4_signing_key(const char *secret, const char *date8, const char *region, const char *service,
                          uint8_t out[32]);

/* Computes the signature of r as 64 lowercase hex digits + NUL, using
 * (and refreshing) c's cached signing key. Errors as
 * mh_sigv4_canonical_request. */
int mh_sigv4_sign(mh_sigv4_cred_t *c, const mh_sigv4_req_t *r, char sig[65]);

/* Appends the Authorization header value of r to out:
 * "AWS4-HMAC-SHA256 Credential=<akid>/<date>/<region>/<service>/aws4_request,
 * SignedHeaders=<a;b;c>,Signature=<hex>". The request's headers must
 * include every header to sign (host, x-amz-date, x-amz-content-sha256,
 * range, x-amz-copy-source, ...). Errors as mh_sigv4_canonical_request. */
int mh_sigv4_authorization(mh_sigv4_cred_t *c, const mh_sigv4_req_t *r, mh_buf_t *out);

/* Query signing (presigned URLs): appends to out the complete encoded,
 * sorted query string of r's own parameters plus X-Amz-Algorithm,
 * X-Amz-Credential, X-Amz-Date, X-Amz-Expires (= expires_s, 1..604800)
 * and X-Amz-SignedHeaders, ending with "&X-Amz-Signature=<hex>". r's
 * payload hash is normally MH_SIGV4_UNSIGNED_PAYLOAD; r->query must not
 * contain X-Amz-* authentication parameters. Errors: MH_EINVAL (as
 * above, or expires out of range), MH_ENOMEM. */
int mh_sigv4_presign(mh_sigv4_cred_t *c, const mh_sigv4_req_t *r, uint32_t expires_s, mh_buf_t *out);

/* --------------------------------------------------- S3 error bodies */

/* Looks at most at the first MH_S3_XML_SCAN_MAX bytes of an S3 response
 * body for an <Error> element and copies the text of its first <Code> and
 * <Message> children into code / msg (each NUL-terminated, truncated to
 * size-1; bytes outside printable ASCII become '?', so the result is safe
 * for one log line). Either output may be NULL (size 0). Returns 0 when
 * an <Error> with a <Code> was found (msg may be empty), MH_EPARSE
 * otherwise (outputs then hold ""). Used for error statuses and for the
 * "200 OK with an error inside" answers of CopyObject. Never reads past
 * body[n-1]; linear time. */
#define MH_S3_XML_SCAN_MAX 65536u
int mh_s3_xml_error(const char *body, size_t n, char *code, size_t code_size, char *msg, size_t msg_size);

/* --------------------------------------------------- S3 result bodies */

/* Finds the next element <tag>...</tag> in [p, end) (tag a plain name,
 * no attributes, as S3 writes them): *inner / *inner_n get its content;
 * returns the position just past </tag>, or NULL when there is none.
 * Linear; never reads outside [p, end). For ListObjectsV2 <Contents>,
 * ListMultipartUploads <Upload>. */
const char *mh_s3_xml_next(const char *p, const char *end, const char *tag, const char **inner, size_t *inner_n);

/* Copies the text of the first <tag> inside p[0..n) into out (size
 * bytes, NUL-terminated), decoding the five predefined XML entities.
 * Errors: MH_EPARSE (absent), MH_ELIMIT (does not fit: never truncated,
 * an UploadId or key cut short would name something else), MH_EINVAL (a
 * byte outside printable ASCII, an unknown entity). */
int mh_s3_xml_text(const char *p, size_t n, const char *tag, char *out, size_t size);

/* Parses the leading "YYYY-MM-DDTHH:MM:SS" of an ISO-8601 UTC time (S3's
 * LastModified, Initiated; fractions and the Z are ignored) into unix
 * seconds. MH_EPARSE. */
int mh_s3_iso_time(const char *s, int64_t *out);

#endif
