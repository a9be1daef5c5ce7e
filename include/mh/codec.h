/*
 * codec.h — one small value view for request bodies and pack bodies, and
 * one writer API that emits msgpack or JSON (SPEC section 4, "Formats").
 *
 * Reading msgpack: our own bounded, zero-copy reader. It exists because
 * msgpack-c's unpacker allocates count * 24 bytes for an array or map
 * header *before* reading the elements, so a 5-byte untrusted input can
 * ask for ~100 GB; ours checks every count against the bytes left and a
 * configured maximum, bounds nesting depth, and points str/bin values into
 * the input (so the mpack reader gets each blob's byte offset for free).
 * Reading JSON: jansson, converted into the same view (strings copied into
 * the arena). Writing: msgpack-c's packer, and jansson for JSON.
 *
 * Values live in an arena; str/bin of msgpack input borrow the input
 * buffer, which must outlive the values.
 */
#ifndef MH_CODEC_H
#define MH_CODEC_H

#include "mh/core.h"

typedef enum {
    MH_V_NIL = 0,
    MH_V_BOOL,
    MH_V_INT,   /* negative integers: v.i */
    MH_V_UINT,  /* non-negative integers: v.u (JSON integers >= 0 too) */
    MH_V_FLOAT,
    MH_V_STR,   /* UTF-8 not validated by the decoder; v.s */
    MH_V_BIN,   /* msgpack bin; v.s */
    MH_V_ARR,
    MH_V_MAP,
} mh_vtype_t;

typedef struct mh_val mh_val_t;
typedef struct mh_kv mh_kv_t;

struct mh_val {
    mh_vtype_t t;
    union {
        bool b;
        int64_t i;
        uint64_t u;
        double f;
        struct {
            const char *p; /* not NUL-terminated */
            uint32_t n;
        } s;
        struct {
            mh_val_t *items;
            uint32_t n;
        } a;
        struct {
            mh_kv_t *kv;
            uint32_t n;
        } m;
    } v;
};

struct mh_kv {
    mh_val_t k;
    mh_val_t v;
};

/* Bounds applied while decoding untrusted bytes. */
typedef struct {
    uint32_t max_depth;    /* nesting of arrays/maps; e.g. 32 */
    uint32_t max_items;    /* total array elements + map pairs; e.g. 1<<24 */
} mh_decode_limits_t;

extern const mh_decode_limits_t mh_decode_limits_default; /* depth 32, items 16M */

/* Decodes exactly one msgpack value spanning all of buf[0..len).
 * Trailing bytes, truncation, a count larger than the bytes left, depth or
 * item counts over the limits, and reserved/ext types are errors
 * (MH_EPARSE or MH_ELIMIT) with a one-line reason in *why (static string).
 * Array/map counts are checked against the bytes left (>= 1 per element,
 * >= 2 per pair) and lim->max_items before anything is allocated; nesting
 * deeper than lim->max_depth containers is refused. lim NULL = default.
 * str/bin point into buf. Map keys may be of any type. Signed integers
 * >= 0 become MH_V_UINT; float32 is widened to double. Nodes are
 * allocated in arena `a` (MH_ENOMEM when it refuses). */
int mh_msgpack_decode(mh_arena_t *a, const uint8_t *buf, size_t len, const mh_decode_limits_t *lim,
                      mh_val_t *out, const char **why);

/* Decodes one msgpack value from the start of buf[0..len) (a stream
 * reader's chunk; the value may continue past it): 0 with *used = the
 * bytes it took and *items (may be NULL) = its array elements + map
 * pairs; 1 when buf ends before the value does (*out is NIL; nodes may
 * have been allocated in `a`); or the errors of mh_msgpack_decode, with
 * the same bounds except that counts and lengths running past buf mean 1,
 * not an error. str/bin point into buf. */
int mh_msgpack_decode_prefix(mh_arena_t *a, const uint8_t *buf, size_t len, const mh_decode_limits_t *lim,
                             mh_val_t *out, size_t *used, uint64_t *items, const char **why);

/* Decodes one JSON document (jansson, JSON_REJECT_DUPLICATES) into the
 * view. Any top-level type is accepted (the caller checks it); trailing
 * bytes are an error; "\u0000" is kept inside strings (they carry their
 * length). Integers >= 0 become MH_V_UINT, negative ones MH_V_INT, other
 * numbers MH_V_FLOAT. Strings are copied into the arena. Errors: MH_EPARSE
 * (syntax, duplicate key, invalid UTF-8) with *why allocated in `a`, or
 * MH_ELIMIT (depth/items; *why static), MH_ENOMEM. */
int mh_json_decode(mh_arena_t *a, const uint8_t *buf, size_t len, const mh_decode_limits_t *lim,
                   mh_val_t *out, const char **why);

/* Map lookup by STR key (linear; maps here are small). Returns the first
 * match; NULL when absent or when map is not a MAP. */
const mh_val_t *mh_val_get(const mh_val_t *map, const char *key);
/* True when v is a str equal to lit. */
bool mh_val_streq(const mh_val_t *v, const char *lit);
/* Deep equality of two values: same type, and the same scalar, bytes, or
 * items (arrays and maps in order, map keys compared as values). A float
 * equals a float of the same value, and NaN equals NaN (a decode of an
 * encode keeps it). INT and UINT are different types even for the same
 * number. For tests and round-trip checks. */
bool mh_val_equal(const mh_val_t *a, const mh_val_t *b);
/* NUL-terminated copy of a STR value into the arena; NULL if not a STR,
 * if the string contains a NUL byte (it would be silently truncated), or
 * on ENOMEM. */
char *mh_val_cstr(mh_arena_t *a, const mh_val_t *v);

/* True when p[0..n) is well-formed UTF-8 (no overlongs, no surrogates,
 * nothing above U+10FFFF). */
bool mh_utf8_valid(const char *p, size_t n);

/* ---------------------------------------------------------------- writer */

/* Building a response: create values in an arena, then encode.
 * Maps and arrays grow as items are added (amortised doubling). Any
 * ARR/MAP node may be grown, decoded ones included (every node's storage
 * has room for the next power of two of its count); a node shared by
 * mh_v_ref copies must only be grown through one of them. */
mh_val_t *mh_v_map(mh_arena_t *a);
mh_val_t *mh_v_arr(mh_arena_t *a);
/* Appends; MH_ENOMEM on failure, and also for a
 * STR value whose pointer is NULL (mh_v_str of a failed arena copy) or a NULL key, so
 * callers may pass mh_v_str(mh_strdup(...)) unchecked. `key` must outlive the value (use a
 * literal or arena string). Strings are borrowed, not copied. */
int mh_map_put(mh_arena_t *a, mh_val_t *map, const char *key, mh_val_t v);
int mh_arr_push(mh_arena_t *a, mh_val_t *arr, mh_val_t v);

/* A value builder whose errors are sticky: a whole answer is built
 * without checking a single call. The first failure (ENOMEM, a NULL node
 * from a failed allocation) is kept in err, every later call does
 * nothing, and whoever sends the value checks err once (http's
 * mh_res_val, the jobs' mh_job_done). Values live in arena a. */
typedef struct {
    mh_arena_t *a;
    int err; /* 0 or the first MH_E* */
} mh_vb_t;

void mh_vb_init(mh_vb_t *b, mh_arena_t *a);
/* New containers; NULL after (or on) a failure. */
mh_val_t *mh_vb_map(mh_vb_t *b);
mh_val_t *mh_vb_arr(mh_vb_t *b);
/* map[key] = v / arr += v; key must outlive the value (a literal or an
 * arena string). No-op once failed or when the container is NULL. */
void mh_vb_put(mh_vb_t *b, mh_val_t *map, const char *key, mh_val_t v);
void mh_vb_push(mh_vb_t *b, mh_val_t *arr, mh_val_t v);
/* A string copied into the arena; nil for a NULL s (not an error). */
mh_val_t mh_vb_str(mh_vb_t *b, const char *s);
mh_val_t mh_vb_strn(mh_vb_t *b, const char *s, size_t n);
/* *node (a container built above); nil, and MH_ENOMEM recorded, for
 * NULL. */
mh_val_t mh_vb_node(mh_vb_t *b, const mh_val_t *node);
/* Convenience constructors (by value). */
mh_val_t mh_v_nil(void);
mh_val_t mh_v_bool(bool b);
mh_val_t mh_v_int(int64_t i);              /* i >= 0 gives MH_V_UINT */
mh_val_t mh_v_uint(uint64_t u);
mh_val_t mh_v_float(double f);
mh_val_t mh_v_str(const char *s);            /* NUL-terminated, borrowed */
mh_val_t mh_v_strn(const char *s, size_t n); /* borrowed */
mh_val_t mh_v_bin(const void *p, size_t n);  /* borrowed */
mh_val_t mh_v_ref(const mh_val_t *v);        /* copies the node (shallow) */

typedef enum { MH_FMT_JSON = 0, MH_FMT_MSGPACK = 1 } mh_format_t;

/* Encodes v into out (appending). In JSON (compact): BIN becomes a base64
 * string, NaN/Inf become null, a UINT above INT64_MAX becomes a real, STR
 * bytes that are not UTF-8 get U+FFFD per invalid sequence, and non-STR
 * map keys are written as their JSON text (ARR/MAP keys cannot be and
 * fail). On failure nothing is appended (out->len is restored).
 * Errors: MH_ENOMEM (also, in JSON, for an ARR/MAP key), MH_EINVAL (a bad
 * vtype, or a str/bin over 4 GiB in msgpack). */
int mh_encode(const mh_val_t *v, mh_format_t fmt, mh_buf_t *out);

/* msgpack packer writing into an mh_buf_t, for streaming encoders (the
 * pack writer) that know their counts. Thin wrappers over msgpack-c. */
typedef struct {
    mh_buf_t *out;
    int err; /* sticky: MH_ENOMEM, or MH_EINVAL for a str/bin over 4 GiB */
} mh_mpw_t;
void mh_mpw_init(mh_mpw_t *w, mh_buf_t *out);
void mh_mpw_map(mh_mpw_t *w, uint32_t n);
void mh_mpw_arr(mh_mpw_t *w, uint32_t n);
void mh_mpw_str(mh_mpw_t *w, const char *p, size_t n);
void mh_mpw_cstr(mh_mpw_t *w, const char *s);
void mh_mpw_bin_header(mh_mpw_t *w, size_t n); /* caller appends n bytes */
void mh_mpw_bin(mh_mpw_t *w, const void *p, size_t n);
void mh_mpw_nil(mh_mpw_t *w);
void mh_mpw_bool(mh_mpw_t *w, bool b);
void mh_mpw_int(mh_mpw_t *w, int64_t i);
void mh_mpw_uint(mh_mpw_t *w, uint64_t u);
void mh_mpw_float(mh_mpw_t *w, double f);
/* Appends n bytes that already are msgpack (splicing a stored value). */
void mh_mpw_raw(mh_mpw_t *w, const void *p, size_t n);
/* Writes a decoded value back as msgpack (for verbatim metadata). */
void mh_mpw_val(mh_mpw_t *w, const mh_val_t *v);

#endif
