/*
 * auth.c — identities and permissions (SPEC sections 4 and 5).
 * Permission is decided from the repository row and the caller's
 * collaborator role only; private repositories answer 404 to callers
 * without READ (the handlers do that with mh_auth_perm's result).
 * Signatures are in msign.c, structured fields in sf.c, the request gate
 * and key cache in gate.c, rate limits in ratelimit.c.
 */
#include "mh/auth.h"

#include <string.h>

void mh_identity_id(const char *handle, size_t n, mh_id_t *out) { mh_blob_id(handle, n, out); }

mh_perm_t mh_auth_perm(const mh_caller_t *caller, const char *owner_id, bool is_public, const char *collab_role)
{
    if (caller && !caller->anonymous) {
        if (caller->is_admin || strcmp(caller->identity_id.s, owner_id) == 0) return MH_PERM_ADMIN;
        if (collab_role) {
            if (!strcmp(collab_role, "admin")) return MH_PERM_ADMIN;
            if (!strcmp(collab_role, "write")) return MH_PERM_WRITE;
            if (!strcmp(collab_role, "read")) return MH_PERM_READ;
        }
    }
    return is_public ? MH_PERM_READ : MH_PERM_NONE;
}

const mh_caller_t *mh_caller_anonymous(void)
{
    static const mh_caller_t anon = {.anonymous = true};
    return &anon;
}

bool mh_handle_valid(const char *h, size_t n)
{
    if (n == 0 || n > 64) return false;
    for (size_t i = 0; i < n; i++) {
        char c = h[i];
        bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '-'))) return false;
    }
    /* "/api/..." is the API's own first path segment. */
    return !(n == 3 && !strncmp(h, "api", 3));
}
