/*
 * auth.h — who is calling (SPEC section 5) and what they may do.
 *
 * The caller is attached to each request by mh_auth_pre_route (the http
 * pre-route hook): a valid MSign signature names an identity; with
 * MUSEHUB_DEV_IDENTITY set, unsigned requests act as that admin identity
 * (loopback listeners only); otherwise the caller is anonymous.
 */
#ifndef MH_AUTH_H
#define MH_AUTH_H

#include "mh/core.h"

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

#endif
