/*
 * admin.h — the operator's commands of the server binary (SPEC 6) that
 * work on the database and the store directly, without a running server:
 * identities and keys (`musehubd identity ...`) and the consistency check
 * (`musehubd fsck`). Implemented in src/admin/.
 *
 * They use synchronous libpq (one short-lived session each) and print to
 * the FILE* they are given; errors go to stderr as one line
 * "musehubd <command>: ...". Each returns the process exit status:
 * 0 success, 1 failure (or problems found), 2 bad usage.
 */
#ifndef MH_ADMIN_H
#define MH_ADMIN_H

#include <stdio.h>

#include "mh/config.h"

/* `musehubd identity add --handle H --public-key-file F [--admin]
 * [--agent]`: registers identity H (flags only ever gain) with the ECDSA
 * P-256 public key in PEM file F and prints its key id (SPEC 1, 5). A key
 * already registered to another identity is refused (1). Applies pending
 * migrations first (the first admin is made on a fresh database). */
int mh_admin_identity_add(const mh_config_t *cfg, const char *handle, const char *keyfile, bool admin, bool agent,
                          FILE *out);

/* `musehubd identity list [--handle H] [--json]`: every identity (or H)
 * with its keys, one line per key:
 *   HANDLE  FLAGS  KEY_ID  ADDED  REVOKED
 * (FLAGS: admin, agent, admin+agent or -; an identity without keys has
 * one line with KEY_ID "-"), or with json one JSON document
 * {"identities": [{handle, identity_id, is_admin, is_agent, created_at,
 * keys: [{key_id, created_at, revoked_at}]}]}. Times are UTC ISO-8601.
 * An unknown H is 1. */
int mh_admin_identity_list(const mh_config_t *cfg, const char *handle, bool json, FILE *out);

/* `musehubd identity revoke --key-id K`: sets the key's revoked_at (the
 * first revocation time is kept: revoking twice is not an error) and
 * prints "revoked K (handle)". Running servers stop accepting the key
 * within their key-cache lifetime (5 s, docs/auth.md). An id that is not
 * sha256:<64 hex> is 2, an unknown key 1. */
int mh_admin_identity_revoke(const mh_config_t *cfg, const char *key_id, FILE *out);

/* `musehubd fsck [--repo OWNER/SLUG] [--repair]`. */
typedef struct {
    const char *repo; /* "owner/slug", or NULL for the whole server */
    bool repair;      /* delete orphaned staged uploads and unreferenced packs past the grace period */
} mh_fsck_opts_t;

/* Checks that the database and the store agree (docs/operations.md,
 * "Checking: fsck"): every branch head, ref row, snapshot delta, object
 * location (objects.storage_uri and mpack_index rows, one parser per URI
 * form) and pack row points at something that exists, in the database and
 * in the store; and, for the whole server, that every pack under mpacks/
 * is referenced or within MUSEHUB_MPACK_GRACE_SECONDS and every staged
 * upload under incoming/ belongs to a live push grant (or is within the
 * grace period). The database is read in one REPEATABLE READ snapshot and
 * the store listed after it, so concurrent pushes, GCs and sweeps do not
 * show up as problems. Prints a report to out. With repair, removes what
 * is repairable (only orphaned staged uploads and unreferenced packs past
 * the grace period, under the same advisory lock as the sweep) and says
 * so. Returns 0 when nothing is wrong (or everything found was repaired),
 * 1 when problems remain or the check could not complete, 2 bad usage
 * (unknown repository). */
int mh_fsck(const mh_config_t *cfg, const mh_fsck_opts_t *opts, FILE *out);

#endif
