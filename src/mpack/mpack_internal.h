/*
 * mpack_internal.h — helpers shared by the mpack module's .c files only.
 */
#ifndef MH_MPACK_INTERNAL_H
#define MH_MPACK_INTERNAL_H

#include <string.h>

#include "mh/mpack.h"

/* Bytewise path order, a proper prefix first. Since paths hold no NUL,
 * this is also the order of SPEC's "path 0x00 object_id" strings. */
static inline int mh_path_cmp(const char *a, size_t an, const char *b, size_t bn)
{
    size_t m = an < bn ? an : bn;
    int c = memcmp(a, b, m);
    if (c) return c;
    return an < bn ? -1 : an > bn;
}

/* mh_id_valid without branches: core's version exits on the first bad
 * digit, which makes it mispredict on random hex (~100 ns an id, 40% of
 * parsing a pack); this one checks all 64 digits and vectorises. */
static inline bool mh_id_ok(const char *p, size_t n)
{
    if (!p || n != MH_ID_LEN || memcmp(p, "sha256:", 7) != 0) return false;
    unsigned bad = 0;
    for (int i = 7; i < MH_ID_LEN; i++) {
        uint8_t c = (uint8_t)p[i];
        bad |= (unsigned)((uint8_t)(c - '0') > 9) & (unsigned)((uint8_t)(c - 'a') > 5);
    }
    return bad == 0;
}

/* Index of the first entry whose path is >= (path, plen). */
size_t mh__manifest_lower_bound(const mh_manifest_t *m, const char *path, size_t plen);

/* Records that entries from index i on may have changed (cache upkeep). */
static inline void mh_manifest_dirty(mh_manifest_t *m, size_t i)
{
    if (i < m->dirty) m->dirty = i;
}

/* Makes room for at least `need` entries. MH_ENOMEM. */
int mh__manifest_reserve(mh_manifest_t *m, size_t need);

#endif
