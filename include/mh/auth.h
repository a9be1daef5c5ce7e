/*
 * auth.h — who is calling (SPEC section 5) and what they may do (SPEC 4).
 *
 * The caller is attached to each request by mh_auth_pre_route (called from
 * the http pre-route hook): a valid MSign signature names an identity; with
 * MUSEHUB_DEV_IDENTITY set, unsigned requests act as that admin identity
 * (loopback listeners only); otherwise the caller is anonymous.
 *
 * Layers, bottom up (each usable alone, the lower ones without a loop):
 *   - RFC 8941 structured fields: a strict dictionary parser and the
 *     canonical serializer (sf.c; fuzzed by test/fuzz/fuzz_sfv.c).
 *   - MSign (msign.c): the Signature-Input / Signature / Content-Digest
 *     rules of SPEC 5, the RFC 9421 signature base, P-256 keys (mbedTLS
 *     parsing) and ECDSA verification (libcrypto).
 *   - Rate limiting (ratelimit.c): per-process token buckets.
 *   - The request gate (gate.c): parses in the pre-route hook, then looks
 *     the key up (per-process cache, else PostgreSQL) and verifies once the
 *     body is complete, before the handler runs.
 */
#ifndef MH_AUTH_H
#define MH_AUTH_H

#include "mh/config.h"
#include "mh/core.h"
#include "mh/db.h"
#include "mh/http.h"

typedef struct {
    bool anonymous;
    mh_id_t identity_id; /* sha256(handle) */
    const char *handle;  /* NULL when anonymous */
    bool is_admin, is_agent;
} mh_caller_t;

/* Repository permission levels, ordered. */
typedef enum { MH_PERM_NONE = 0, MH_PERM_READ, MH_PERM_WRITE, MH_PERM_ADMIN } mh_perm_t;

/* The identity id of a handle: sha256(handle UTF-8) (SPEC 1). */
void mh_identity_id(const char *handle, size_t n, mh_id_t *out);

/* The caller's permission on a repository: admin or owner -> ADMIN; a
 * collaborator -> their role (role text "read"|"write"|"admin", NULL when
 * none); anyone -> READ on a public repository; else NONE. */
mh_perm_t mh_auth_perm(const mh_caller_t *caller, const char *owner_id, bool is_public, const char *collab_role);

/* The anonymous caller (static). */
const mh_caller_t *mh_caller_anonymous(void);

/* True when h[0..n) is an acceptable handle for a new identity:
 * 1..64 bytes of [A-Za-z0-9._-], starting with a letter or digit, and not
 * a reserved first path segment of the API ("api"). Decision recorded in
 * docs/auth.md (SPEC is silent). */
bool mh_handle_valid(const char *h, size_t n);

/* ============================================ RFC 8941 structured fields */

/* Bare item types (RFC 8941 3.3). */
typedef enum { MH_SF_INT = 1, MH_SF_DEC, MH_SF_STR, MH_SF_TOKEN, MH_SF_BYTES, MH_SF_BOOL } mh_sf_type_t;

typedef struct {
    mh_sf_type_t t;
    int64_t i;  /* INT: the value (|i| < 10^15); DEC: value * 1000; BOOL: 0 or 1 */
    mh_str_t s; /* STR: unescaped text; TOKEN: the token; BYTES: the decoded
                 * bytes. Arena memory, NUL-terminated (s.n excludes it). */
} mh_sf_bare_t;

typedef struct {
    mh_str_t key; /* points into the parsed input */
    mh_sf_bare_t v;
} mh_sf_param_t;

typedef struct {
    mh_sf_param_t *p; /* in order of first appearance; a repeated key keeps
                       * its first position and its last value (RFC 8941) */
    uint32_t n;
} mh_sf_params_t;

typedef struct {
    mh_sf_bare_t v;
    mh_sf_params_t params;
} mh_sf_item_t;

/* A dictionary member: an item, or an inner list with its parameters. */
typedef struct {
    mh_str_t key;          /* points into the parsed input */
    bool inner;            /* true: items/nitems/params; false: item */
    mh_sf_item_t item;
    mh_sf_item_t *items;
    uint32_t nitems;
    mh_sf_params_t params; /* of the inner list */
} mh_sf_member_t;

typedef struct {
    mh_sf_member_t *m; /* members in order (repeated keys: see params) */
    uint32_t n;
    uint32_t nparsed;  /* members as written, a repeated key counted each
                        * time: n < nparsed when a key was repeated */
} mh_sf_dict_t;

/* Bounds on one parsed field: members, items per inner list, parameters
 * per item or list. Past them the parse fails with MH_ELIMIT. */
#define MH_SF_MAX_MEMBERS 64
#define MH_SF_MAX_ITEMS 64
#define MH_SF_MAX_PARAMS 32

/* Parses a header field value as an RFC 8941 Dictionary (section 4.2.2,
 * with leading/trailing SP discarded as in 4.2). Everything is validated:
 * keys, integers (15 digits), decimals (12.3 digits), strings (printable
 * ASCII, only \" and \\ escapes), tokens, byte sequences (base64; missing
 * padding accepted as RFC 8941 4.2.7 advises), booleans, parameters, inner
 * lists, separators; trailing garbage is an error. An empty value is an
 * empty dictionary.
 * a:   arena for members, items and decoded strings/bytes; keys and tokens
 *      point into p[0..n), which must outlive the result.
 * Returns 0, MH_EPARSE (with a static reason in *why), MH_ELIMIT, or
 * MH_ENOMEM. */
int mh_sf_parse_dict(mh_arena_t *a, const char *p, size_t n, mh_sf_dict_t *out, const char **why);

/* The member named key (NUL-terminated), or NULL. */
const mh_sf_member_t *mh_sf_dict_get(const mh_sf_dict_t *d, const char *key);

/* The parameter named key, or NULL. */
const mh_sf_bare_t *mh_sf_param_get(const mh_sf_params_t *ps, const char *key);

/* Appends the canonical RFC 8941 serialization (section 4.1) of a member's
 * value: an inner list "(...)" with its parameters, or an item with its
 * parameters. MH_ENOMEM (out may then hold a partial append). */
int mh_sf_serialize_member(mh_buf_t *out, const mh_sf_member_t *m);

/* Appends the canonical serialization of a whole dictionary (members
 * joined by ", "; a member whose value is boolean true is written as its
 * key plus parameters). MH_ENOMEM. */
int mh_sf_serialize_dict(mh_buf_t *out, const mh_sf_dict_t *d);

/* ============================================================= MSign */

#define MH_MSIGN_LABEL "msign"
#define MH_MSIGN_ALG "ecdsa-p256-sha256"
#define MH_MSIGN_MAX_SKEW 300 /* seconds either side of the server clock */

/* A parsed MSign signature (SPEC 5). */
typedef struct {
    char keyid[MH_ID_SIZE]; /* "sha256:<64 hex>" */
    int64_t created;        /* unix seconds */
    int64_t expires;        /* unix seconds; 0 when absent */
    bool covers_digest;     /* the covered list ends with "content-digest" */
    uint8_t sig[64];        /* raw r || s, big-endian */
    /* The value of "@signature-params": the canonical serialization of the
     * Signature-Input member (inner list + parameters), in the arena. */
    const char *params;
    size_t params_len;
} mh_msign_t;

/* Parses the Signature-Input and Signature header values strictly:
 * both must be RFC 8941 dictionaries with exactly one member, labelled
 * "msign"; Signature-Input's member an inner list of exactly
 * ("@method" "@path" "@query") or ("@method" "@path" "@query"
 * "content-digest"), items without parameters, with parameters created
 * (integer, required), keyid (string, a key id, required), alg (string
 * "ecdsa-p256-sha256", required) and optionally expires (integer), nonce
 * and tag (strings), nothing else; Signature's member a byte sequence of
 * 64 bytes without parameters, whose s is at most n/2 (low-S). A label
 * that appears twice in one field line ("msign=..., msign=...", which
 * RFC 8941 would fold into its last value) is refused.
 * Returns 0, or MH_EAUTH / MH_ENOMEM with a static reason in *why (for
 * the log only: clients get a bare 401). */
int mh_msign_parse(mh_arena_t *a, mh_str_t sig_input, mh_str_t signature, mh_msign_t *out, const char **why);

/* True when the s half of a raw r||s P-256 signature is above n/2 (the
 * group order's half): a "high-S" signature, refused by mh_msign_parse
 * (SPEC 5). */
bool mh_msign_high_s(const uint8_t sig[64]);

/* Checks created (|now - created| <= MH_MSIGN_MAX_SKEW) and expires (when
 * present, now <= expires). 0 or MH_EAUTH with *why. */
int mh_msign_check_time(const mh_msign_t *m, int64_t now, const char **why);

/* Binds the body (SPEC 5, RFC 9530): a non-empty body requires
 * covers_digest and a Content-Digest header (value content_digest, p NULL
 * when absent) whose "sha-256" member is the SHA-256 of body[0..n); an
 * empty body requires !covers_digest. 0 or MH_EAUTH / MH_ENOMEM with *why.
 * a: scratch arena for parsing the header. */
int mh_msign_check_body(mh_arena_t *a, const mh_msign_t *m, mh_str_t content_digest, const void *body, size_t n,
                        const char **why);

/* One covered component of a signature base: its identifier as it appears
 * in the base (already lowercase, e.g. "@method", "content-digest") and its
 * value. */
typedef struct {
    const char *name;
    mh_str_t value;
} mh_sig_component_t;

/* Appends the RFC 9421 section 2.5 signature base: one line
 * "\"<name>\": <value>" per component, each followed by "\n", then
 * "\"@signature-params\": <params>" (no final newline). Component values
 * must not contain CR or LF (MH_EINVAL). MH_ENOMEM. */
int mh_sig_base(mh_buf_t *out, const mh_sig_component_t *c, size_t n, mh_str_t params);

/* The MSign signature base of a request: @method, @path (an empty path is
 * "/"), @query ("?" + query, "?" alone when empty; RFC 9421 2.2.7) and, when
 * m->covers_digest, content-digest (the header value as received), then
 * @signature-params = m->params. MH_EINVAL / MH_ENOMEM. */
int mh_msign_base(mh_buf_t *out, const mh_msign_t *m, mh_str_t method, mh_str_t path, mh_str_t query,
                  mh_str_t content_digest);

/* ------------------------------------------------------- P-256 keys */

#define MH_SPKI_MAX 256 /* a P-256 SubjectPublicKeyInfo in DER is 91 bytes */

/* Parses an ECDSA P-256 public key given as PEM ("-----BEGIN PUBLIC
 * KEY-----", SubjectPublicKeyInfo) or as DER SubjectPublicKeyInfo, and
 * writes its canonical DER SubjectPublicKeyInfo (named curve, uncompressed
 * point) into der[0..cap), *der_len its length. The key id (SPEC 1) is
 * mh_blob_id of those bytes. Returns 0, MH_EPARSE (not a key, not EC, not
 * P-256) or MH_ELIMIT (cap too small). */
int mh_p256_spki(const void *in, size_t n, uint8_t *der, size_t cap, size_t *der_len);

/* A parsed P-256 public key ready for verification (opaque; OpenSSL
 * libcrypto, about 35x faster than mbedTLS here: see msign.c). */
typedef struct mh_p256_key mh_p256_key_t;

/* Parses a DER SubjectPublicKeyInfo of a P-256 key into *out (heap; free
 * with mh_p256_key_free). MH_EPARSE, MH_ENOMEM. */
int mh_p256_key_new(const uint8_t *der, size_t n, mh_p256_key_t **out);
void mh_p256_key_free(mh_p256_key_t *k);

/* Verifies an ecdsa-p256-sha256 signature (raw r||s, 64 bytes, RFC 9421
 * 3.3.4) over msg[0..n) (SHA-256 of msg, ECDSA P-256). Returns 0 when
 * valid, MH_EAUTH otherwise (r or s zero or >= the group order included).
 * About 60 us; safe to call from any thread. */
int mh_p256_verify(mh_p256_key_t *k, const void *msg, size_t n, const uint8_t sig[64]);

/* ======================================================== rate limits */

/* Token buckets keyed by a string: `per_minute` tokens per minute, a burst
 * of up to `per_minute` tokens (one minute's budget). Per process (caches
 * are caches, DESIGN 1: with N workers or hosts a client gets up to N
 * times the budget; docs/auth.md). At most max_keys buckets are kept:
 * buckets that have refilled carry no state and are dropped first; if
 * every bucket is busy the table is reset (fail open) with a warning. */
typedef struct mh_ratelimit mh_ratelimit_t;

/* NULL on ENOMEM. per_minute 0 = unlimited (take always allows). */
mh_ratelimit_t *mh_ratelimit_new(uint32_t per_minute, uint32_t max_keys);
void mh_ratelimit_free(mh_ratelimit_t *rl);

/* Takes one token from key's bucket at monotonic time now_ms. Returns 0
 * when allowed, else the whole seconds (>= 1) until a token is available
 * (the Retry-After value); nothing is taken then. */
uint32_t mh_ratelimit_take(mh_ratelimit_t *rl, const char *key, uint64_t now_ms);

/* ==================================================== the request gate */

typedef struct mh_auth mh_auth_t;

typedef struct {
    uint32_t rate_push;          /* per minute, routes push_presign and push_unpack; 0 disables */
    uint32_t rate_fetch;         /* per minute, route fetch; 0 disables */
    const char *trusted_proxies; /* comma-separated IPs whose X-Forwarded-For is honoured; NULL none */
    uint32_t key_ttl_ms;         /* verified-key cache lifetime; 0 = 5000 */
    uint32_t max_keys;           /* key-cache entries; 0 = 4096 */
} mh_auth_config_t;

/* Creates the per-process authentication state (key cache, rate
 * buckets). db is used for key lookups and must outlive it. Returns 0,
 * MH_EINVAL (a trusted proxy that is not an IP address; logged), MH_ENOMEM. */
int mh_auth_new(mh_db_t *db, const mh_auth_config_t *cfg, mh_auth_t **out);
void mh_auth_free(mh_auth_t *au);

/* mh_auth_new with the settings of cfg (MUSEHUB_RATE_PUSH,
 * MUSEHUB_RATE_FETCH, MUSEHUB_TRUSTED_PROXIES). One per process (workers
 * fork before it is created: DESIGN 1, per-process caches); the hub owns
 * it (mh_hub_t.auth) and frees it at shutdown with mh_auth_free. */
int mh_auth_open(mh_db_t *db, const mh_config_t *cfg, mh_auth_t **out);

/* The pre-route step (SPEC 5), for the http pre_route hook.
 *  - Unrouted requests and streaming routes (the fs store's presigned
 *    PUT) are left alone: anonymous, no rate limit.
 *  - No Signature and no Signature-Input header: the caller is `dev`
 *    (MUSEHUB_DEV_IDENTITY) or anonymous; rate limits are applied now.
 *  - Otherwise the signature is parsed and its time checked now (401 on
 *    failure), and a gate is installed on the request: once the body is
 *    complete it checks Content-Digest, finds the key (cache, else one
 *    query), verifies the ECDSA signature, sets req->caller, applies the
 *    rate limit (429 + Retry-After) and runs the handler. Every
 *    authentication failure is a bare 401 with the reason only in the log;
 *    a database failure is 503.
 * Admin callers are not rate limited. req->caller, when set, points at an
 * mh_caller_t in req->arena (or at dev). */
void mh_auth_pre_route(mh_auth_t *au, mh_req_t *req, const mh_caller_t *dev);

/* Drops a key (after revocation) or every key of an identity (after a
 * change to it) from this process's cache; other processes see the change
 * within key_ttl_ms. */
void mh_auth_forget_key(mh_auth_t *au, const char *key_id);
void mh_auth_forget_identity(mh_auth_t *au, const char *identity_id);

/* The client address of a request for rate limiting: req->peer, or, when
 * the peer is a trusted proxy, the rightmost X-Forwarded-For entry that is
 * not itself a trusted proxy. Returns a string in req->arena (never NULL;
 * "unknown" when nothing is known). */
const char *mh_auth_client_addr(mh_auth_t *au, mh_req_t *req);

#endif
