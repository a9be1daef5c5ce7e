/*
 * identity.c — `musehubd identity add | list | revoke` (SPEC 5, 6): the
 * first administrator is made on the host, not over HTTP, and an operator
 * can see and revoke keys without a signed request.
 *
 * Each command is one short synchronous libpq session. Writes are single
 * statements (atomic without an explicit transaction), with the same
 * rules as the HTTP API (src/hub/identities.c): flags only ever gain, a
 * key id is never re-bound to another identity, revocation keeps the
 * first revocation time.
 */
#include <stdlib.h>
#include <string.h>

#include "admin_internal.h"
#include "mh/auth.h"
#include "mh/db.h"

/* --------------------------------------------------------------- add */

int mh_admin_identity_add(const mh_config_t *cfg, const char *handle, const char *keyfile, bool admin, bool agent,
                          FILE *out)
{
    if (!mh_handle_valid(handle, strlen(handle))) {
        fprintf(stderr,
                "musehubd identity add: bad handle '%s' (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)\n",
                handle);
        return 2;
    }
    /* The key file: read whole (a PEM is tiny), canonicalised to the DER
     * SubjectPublicKeyInfo whose hash is the key id (SPEC 1). */
    FILE *f = fopen(keyfile, "rb");
    char pem[8192];
    size_t pem_len = f ? fread(pem, 1, sizeof pem, f) : 0;
    if (f) fclose(f);
    uint8_t der[MH_SPKI_MAX];
    size_t der_len = 0;
    if (!pem_len || pem_len == sizeof pem || mh_p256_spki(pem, pem_len, der, sizeof der, &der_len)) {
        fprintf(stderr, "musehubd identity add: %s is not an ECDSA P-256 public key in PEM\n", keyfile);
        return 2;
    }
    mh_id_t key_id, ident_id;
    mh_blob_id(der, der_len, &key_id);
    mh_identity_id(handle, strlen(handle), &ident_id);
    if (mh_db_migrate(cfg->database_url, mh_migrations, mh_migrations_count)) return 1;
    PGconn *c = mh__admin_connect(cfg, "identity add");
    if (!c) return 1;
    const char *vals[6] = {ident_id.s, handle, admin ? "true" : "false", agent ? "true" : "false", key_id.s,
                           (const char *)der};
    int lens[6] = {0, 0, 0, 0, 0, (int)der_len};
    int fmts[6] = {0, 0, 0, 0, 0, 1};
    PGresult *res = PQexecParams(
        c,
        "WITH i AS (INSERT INTO identities (identity_id, handle, is_admin, is_agent) VALUES ($1, $2, $3, $4)"
        "  ON CONFLICT (handle) DO UPDATE SET is_admin = identities.is_admin OR EXCLUDED.is_admin,"
        "  is_agent = identities.is_agent OR EXCLUDED.is_agent RETURNING identity_id),"
        " k AS (INSERT INTO identity_keys (key_id, identity_id, public_key) SELECT $5, identity_id, $6 FROM i"
        "  ON CONFLICT (key_id) DO NOTHING RETURNING 1)"
        " SELECT (SELECT identity_id FROM identity_keys WHERE key_id = $5)",
        6, NULL, vals, lens, fmts, 0);
    int rc = 1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "musehubd identity add: %s", PQresultErrorMessage(res));
    } else if (!PQgetisnull(res, 0, 0) && strcmp(PQgetvalue(res, 0, 0), ident_id.s) != 0) {
        fprintf(stderr, "musehubd identity add: key %s already belongs to another identity\n", key_id.s);
    } else {
        fprintf(out, "%s\n", key_id.s);
        rc = 0;
    }
    PQclear(res);
    PQfinish(c);
    return rc;
}

/* -------------------------------------------------------------- list */

#define ISO(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

/* JSON string of s (identity fields are printable ASCII by the handle
 * rule; escaped anyway). */
static void json_str(FILE *out, const char *s)
{
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(out, "\\%c", *p);
        else if (*p < 0x20) fprintf(out, "\\u%04x", *p);
        else fputc(*p, out);
    }
    fputc('"', out);
}

int mh_admin_identity_list(const mh_config_t *cfg, const char *handle, bool json, FILE *out)
{
    PGconn *c = mh__admin_connect(cfg, "identity list");
    if (!c) return 1;
    const char *vals[1] = {handle};
    PGresult *res = PQexecParams(c,
                                 "SELECT i.handle, i.identity_id, i.is_admin, i.is_agent, " ISO("i.created_at") ","
                                 " k.key_id, " ISO("k.created_at") ", " ISO("k.revoked_at")
                                 " FROM identities i LEFT JOIN identity_keys k ON k.identity_id = i.identity_id"
                                 " WHERE $1::text IS NULL OR i.handle = $1"
                                 " ORDER BY i.handle COLLATE \"C\", k.created_at, k.key_id COLLATE \"C\"",
                                 1, NULL, vals, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "musehubd identity list: %s", PQresultErrorMessage(res));
        PQclear(res);
        PQfinish(c);
        return 1;
    }
    int n = PQntuples(res);
    if (handle && n == 0) {
        fprintf(stderr, "musehubd identity list: no identity '%s'\n", handle);
        PQclear(res);
        PQfinish(c);
        return 1;
    }
    if (json) {
        fputs("{\"identities\": [", out);
        for (int r = 0; r < n; r++) {
            bool first_key = r == 0 || strcmp(PQgetvalue(res, r, 0), PQgetvalue(res, r - 1, 0)) != 0;
            bool last_key = r == n - 1 || strcmp(PQgetvalue(res, r, 0), PQgetvalue(res, r + 1, 0)) != 0;
            if (first_key) {
                fputs(r ? ",\n  {" : "\n  {", out);
                fputs("\"handle\": ", out);
                json_str(out, PQgetvalue(res, r, 0));
                fputs(", \"identity_id\": ", out);
                json_str(out, PQgetvalue(res, r, 1));
                fprintf(out, ", \"is_admin\": %s, \"is_agent\": %s, \"created_at\": ",
                        PQgetvalue(res, r, 2)[0] == 't' ? "true" : "false",
                        PQgetvalue(res, r, 3)[0] == 't' ? "true" : "false");
                json_str(out, PQgetvalue(res, r, 4));
                fputs(", \"keys\": [", out);
            }
            if (!PQgetisnull(res, r, 5)) {
                if (!first_key) fputs(", ", out);
                fputs("{\"key_id\": ", out);
                json_str(out, PQgetvalue(res, r, 5));
                fputs(", \"created_at\": ", out);
                json_str(out, PQgetvalue(res, r, 6));
                fputs(", \"revoked_at\": ", out);
                if (PQgetisnull(res, r, 7)) fputs("null", out);
                else json_str(out, PQgetvalue(res, r, 7));
                fputc('}', out);
            }
            if (last_key) fputs("]}", out);
        }
        fputs(n ? "\n]}\n" : "]}\n", out);
    } else {
        fprintf(out, "%-24s %-11s %-71s %-20s %s\n", "HANDLE", "FLAGS", "KEY_ID", "ADDED", "REVOKED");
        for (int r = 0; r < n; r++) {
            bool adm = PQgetvalue(res, r, 2)[0] == 't', agt = PQgetvalue(res, r, 3)[0] == 't';
            const char *flags = adm && agt ? "admin+agent" : adm ? "admin" : agt ? "agent" : "-";
            bool nokey = PQgetisnull(res, r, 5);
            fprintf(out, "%-24s %-11s %-71s %-20s %s\n", PQgetvalue(res, r, 0), flags,
                    nokey ? "-" : PQgetvalue(res, r, 5), nokey ? "-" : PQgetvalue(res, r, 6),
                    nokey || PQgetisnull(res, r, 7) ? "-" : PQgetvalue(res, r, 7));
        }
    }
    PQclear(res);
    PQfinish(c);
    return 0;
}

/* ------------------------------------------------------------ revoke */

int mh_admin_identity_revoke(const mh_config_t *cfg, const char *key_id, FILE *out)
{
    if (!mh_id_valid(key_id, strlen(key_id))) {
        fprintf(stderr, "musehubd identity revoke: '%s' is not a key id (sha256:<64 hex>)\n", key_id);
        return 2;
    }
    PGconn *c = mh__admin_connect(cfg, "identity revoke");
    if (!c) return 1;
    const char *vals[1] = {key_id};
    /* The old revocation time comes from the row as it was before the
     * update (a second revoke keeps the first time and says so). */
    PGresult *res = PQexecParams(c,
                                 "WITH old AS (SELECT key_id, revoked_at FROM identity_keys WHERE key_id = $1),"
                                 " upd AS (UPDATE identity_keys k SET revoked_at = COALESCE(k.revoked_at, now())"
                                 "  FROM old WHERE k.key_id = old.key_id RETURNING k.identity_id, k.revoked_at)"
                                 " SELECT i.handle, old.revoked_at IS NOT NULL, " ISO("upd.revoked_at")
                                 " FROM upd JOIN old ON true JOIN identities i ON i.identity_id = upd.identity_id",
                                 1, NULL, vals, NULL, NULL, 0);
    int rc = 1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "musehubd identity revoke: %s", PQresultErrorMessage(res));
    } else if (PQntuples(res) != 1) {
        fprintf(stderr, "musehubd identity revoke: no key %s\n", key_id);
    } else {
        bool already = PQgetvalue(res, 0, 1)[0] == 't';
        fprintf(out, "%s %s (%s) at %s\n", already ? "already revoked" : "revoked", key_id, PQgetvalue(res, 0, 0),
                PQgetvalue(res, 0, 2));
        rc = 0;
    }
    PQclear(res);
    PQfinish(c);
    return rc;
}
