/*
 * admin_internal.h — private to src/admin/: the database session of a
 * command, and listing every key under a prefix of the object store.
 */
#ifndef MH_ADMIN_INTERNAL_H
#define MH_ADMIN_INTERNAL_H

#include <libpq-fe.h>
#include <uv.h>

#include "mh/admin.h"
#include "mh/store.h"

/* A blocking libpq session for command `what` ("fsck", ...), with
 * application_name=musehubd-admin; prints "musehubd <what>: <error>" and
 * returns NULL when the URL is missing or the connection fails. */
PGconn *mh__admin_connect(const mh_config_t *cfg, const char *what);

/* One object of a store listing. */
typedef struct {
    char key[80];      /* "mpacks/<64 hex>" or "incoming/<id>" */
    uint64_t size;     /* bytes */
    int64_t mtime;     /* last modification, Unix seconds */
} mh__store_obj_t;

typedef struct {
    mh__store_obj_t *v;
    size_t n, cap;
} mh__store_list_t;

/* Lists every key under `prefix` ("mpacks/" or "incoming/") of `store`
 * (open on `loop`, which this runs until each page has arrived), sorted by
 * key: the store's own listing (mh_store_list, which passes over names
 * that are not valid keys). Appends to *out (free with
 * mh__store_list_free). Returns 0, or -1 after printing one line to
 * stderr. */
int mh__store_list(mh_store_t *store, uv_loop_t *loop, const char *prefix, mh__store_list_t *out);
void mh__store_list_free(mh__store_list_t *l);

/* A location of an object's bytes, parsed by fsck: the pack, the byte
 * range of the pack file it names (the blob's own bytes for v1; the
 * frame's data for v2) and the blob's length. */
typedef struct {
    char pack[MH_ID_SIZE];
    uint64_t file_off, file_len, blob_len;
} mh__location_t;

/* Parses "mpack://<pack id>#<off>:<len>" (SPEC 2) or
 * "mpack://<pack id>#<frame off>:<frame len>/<off>:<len>" (SPEC 2.1) into
 * *l; false for anything else (another scheme, a bad id, a number that
 * does not fit 64 bits, trailing bytes). Exposed for the unit tests. */
bool mh__fsck_parse_location(const char *uri, mh__location_t *l);

#endif
