/*
 * merge.h — private to src/hub/: the pure parts of proposals and merges
 * (SPEC 4.6): the three-way merge of manifests by path, the per-path
 * change summary between two manifests, and the merge base (best common
 * ancestor) on a repository's in-memory commit graph. Implemented in
 * merge.c; unit-tested by test/unit/test_merge.c.
 *
 * Invariants: nothing here does I/O or touches the loop; every function
 * is thread-safe on inputs nobody changes meanwhile. Results borrow path
 * and id bytes from the input manifests, which must outlive them.
 */
#ifndef MH_HUB_MERGE_H
#define MH_HUB_MERGE_H

#include "hub_internal.h"

/* A path borrowed from a manifest entry (not NUL-terminated). */
typedef struct {
    const char *path;
    uint32_t plen;
} mh_mpath_t;

/* Three-way merge of manifests by path (SPEC 4.6). For every path in any
 * of the three, with b, o, t its object id in base, ours, theirs (or
 * absent):
 *   o == t            -> o   (unchanged, or changed identically on both;
 *                             both deleting it deletes it)
 *   o == b            -> t   (only theirs changed it: added, modified or
 *                             deleted)
 *   t == b            -> o   (only ours changed it)
 *   otherwise         -> a conflict (changed differently on both sides,
 *                             including modified on one side and deleted
 *                             on the other, and added on both with
 *                             different contents).
 * base:  the merge base's manifest; an empty manifest ({0}) for unrelated
 *        histories (then a path present on both sides with different ids
 *        conflicts).
 * out:   an initialised manifest ({0} or a manifest, its entries are
 *        replaced); on success with *nconf == 0 it holds the merged
 *        manifest in path order (entries borrow the inputs' bytes); when
 *        there are conflicts it is left empty.
 * conf:  receives a heap array (free() it; NULL when *nconf == 0) of the
 *        conflicting paths in path order, *nconf their number.
 * Returns 0 or MH_ENOMEM (out empty, *conf NULL). O(|b| + |o| + |t|). */
int mh__merge_manifests(const mh_manifest_t *base, const mh_manifest_t *ours, const mh_manifest_t *theirs,
                        mh_manifest_t *out, mh_mpath_t **conf, size_t *nconf);

/* The paths that differ from `from` to `to`, each list in path order:
 * added (only in to), changed (in both, different object id), removed
 * (only in from). Arrays are allocated in arena `a` (never NULL on
 * success, possibly empty) and borrow the manifests' bytes.
 * Returns 0 or MH_ENOMEM. */
typedef struct {
    mh_mpath_t *added, *changed, *removed;
    size_t nadded, nchanged, nremoved;
} mh_mchanges_t;
int mh__manifest_changes(mh_arena_t *a, const mh_manifest_t *from, const mh_manifest_t *to, mh_mchanges_t *out);

/* The merge base of nodes x and y of g (SPEC 4.6, "the best common
 * ancestor"): among the common ancestors of x and y (each node counts as
 * its own ancestor) the one with the highest generation number, ties
 * broken by the smallest commit id (bytewise). A common ancestor of
 * highest generation can never be an ancestor of another common
 * ancestor, so it is always one of git's "best" merge bases.
 * Walks both histories together newest first (a max-heap by generation)
 * and stops below the first generation holding a common ancestor, so the
 * cost is the number of commits above the base, not the repository's.
 * Parents outside the graph (MH_GNONE) are ignored; terminates on any
 * input (a node is processed at most once per flag set, at most three
 * times). *out is MH_GNONE when the histories share no commit.
 * Thread-safe (reads g only). Returns 0, MH_EINVAL (x or y out of range)
 * or MH_ENOMEM. */
int mh__graph_merge_base(const mh_graph_t *g, uint32_t x, uint32_t y, uint32_t *out);

#endif
