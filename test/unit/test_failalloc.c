/*
 * test_failalloc.c — allocation-failure injection over the codec and the
 * storage model (include/mh/failalloc.h), SQLite's method: each workload
 * runs once unarmed (the baseline result), then again with the Nth
 * allocation failing for N = 1, 2, 3, ... until a run completes without
 * reaching N, first in one-shot mode (only the Nth fails) and then in
 * persistent mode (the Nth and all later fail). Every run must end in
 * success with the baseline's exact result, or in MH_ENOMEM; a crash
 * aborts the program (ASan), and leaks are checked after each loop (LSan).
 *
 * Workloads: msgpack decode + re-encode, JSON decode + re-encode, value
 * encoding (both formats; output unchanged on failure), the pack writer,
 * the pack reader + blob verification + commit metadata, and a manifest
 * delta chain (apply, id, clone, diff, encode, decode).
 *
 * In a build without FAILALLOC=1 (make unit, make test-asan) the hook is
 * absent: only the baselines and the self-test of the stubs run.
 */
#include <stdlib.h>
#include <string.h>

#include "mh/codec.h"
#include "mh/failalloc.h"
#include "mh/mpack.h"
#include "tap.h"

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/lsan_interface.h>
#endif

/* Upper bound on N per loop: far above any workload here (a few thousand
 * allocations), it only stops a runaway loop from running forever. */
#define MAX_N 200000

static mh_str_t S(const char *s) { return (mh_str_t){s, s ? strlen(s) : 0}; }
static const mh_str_t NIL = {NULL, 0};

/* ============================================================ fixture */

#define NFILES 16
#define NCOMMITS 12

/* A small history built once, unarmed: paths, blob contents and ids,
 * manifests, snapshot ids, deltas, commit ids; then the pack bytes. */
typedef struct {
    char paths[NFILES + NCOMMITS][32];
    char contents[NFILES + 2 * NCOMMITS][48];
    mh_id_t blob_ids[NFILES + 2 * NCOMMITS];
    size_t nblobs;
    mh_id_t sids[NCOMMITS], cids[NCOMMITS];
    mh_buf_t ups[NCOMMITS], rms[NCOMMITS];
    char msgs[NCOMMITS][24], times[NCOMMITS][40];
    mh_buf_t pack;  /* written by the baseline of wl_pack_write */
    mh_buf_t bad_pack; /* the same with commits[3].snapshot_id spoiled */
    mh_buf_t json;  /* the pack body as JSON (baseline of wl_msgpack) */
} fixture_t;

static fixture_t F;

static size_t add_blob(const char *text)
{
    size_t i = F.nblobs++;
    snprintf(F.contents[i], sizeof F.contents[i], "%s", text);
    mh_blob_id(F.contents[i], strlen(F.contents[i]), &F.blob_ids[i]);
    return i;
}

static int fixture_init(void)
{
    mh_manifest_t prev = {0}, cur = {0};
    int rc = 0;
    for (int i = 0; i < NFILES; i++) {
        snprintf(F.paths[i], sizeof F.paths[i], "src/file_%03d.txt", i);
        char text[48];
        snprintf(text, sizeof text, "base-%d", i);
        size_t b = add_blob(text);
        rc |= mh_manifest_upsert(&cur, F.paths[i], (uint32_t)strlen(F.paths[i]), F.blob_ids[b].s);
    }
    for (int k = 0; k < NCOMMITS; k++) {
        if (k > 0) {
            /* Two files change; "new/<k>.txt" appears and "new/<k-1>.txt"
             * goes, so every delta after the first has a remove. */
            for (int j = 0; j < 2; j++) {
                char text[48];
                snprintf(text, sizeof text, "commit-%d-file-%d", k, j);
                size_t b = add_blob(text);
                const char *p = F.paths[(k * 2 + j) % NFILES];
                rc |= mh_manifest_upsert(&cur, p, (uint32_t)strlen(p), F.blob_ids[b].s);
            }
            snprintf(F.paths[NFILES + k], sizeof F.paths[NFILES + k], "new/%d.txt", k);
            const char *np = F.paths[NFILES + k];
            rc |= mh_manifest_upsert(&cur, np, (uint32_t)strlen(np), F.blob_ids[0].s);
            if (k > 1) rc |= mh_manifest_remove(&cur, F.paths[NFILES + k - 1], strlen(F.paths[NFILES + k - 1]));
        }
        mh_manifest_id(&cur, &F.sids[k]);
        uint32_t nu, nr;
        rc |= mh_manifest_diff(&prev, &cur, &F.ups[k], &nu, &F.rms[k], &nr);
        rc |= mh_manifest_clone(&prev, &cur);
        snprintf(F.msgs[k], sizeof F.msgs[k], "commit %d", k);
        snprintf(F.times[k], sizeof F.times[k], "2026-01-01T00:%02d:00+00:00", k);
        mh_str_t parent = k ? S(F.cids[k - 1].s) : NIL;
        mh_commit_id(&parent, k ? 1 : 0, S(F.sids[k].s), S(F.msgs[k]), S(F.times[k]), S("gabriel"), &F.cids[k]);
    }
    mh_manifest_free(&prev);
    mh_manifest_free(&cur);
    return rc;
}

static void fixture_free(void)
{
    for (int k = 0; k < NCOMMITS; k++) {
        mh_buf_free(&F.ups[k]);
        mh_buf_free(&F.rms[k]);
    }
    mh_buf_free(&F.pack);
    mh_buf_free(&F.bad_pack);
    mh_buf_free(&F.json);
}

/* ========================================================== workloads */

/* Each workload returns 0 or an MH_E* code and, on success, a digest of
 * its result so a run under injection can be compared with the baseline.
 * It must free everything it allocated whatever happens. */
typedef int (*workload_fn)(uint8_t digest[32]);

static void digest_buf(const mh_buf_t *b, uint8_t d[32]) { mh_sha256(b->p ? (const void *)b->p : "", b->len, d); }

/* The pack writer: commits with metadata, snapshot deltas, blobs, one
 * branch head. */
static int wl_pack_write(uint8_t d[32])
{
    mh_buf_t out = {0}, meta = {0};
    mh_packw_t w;
    mh_packw_init(&w, &out);
    mh_packw_commits(&w, NCOMMITS);
    for (int k = 0; k < NCOMMITS; k++) {
        /* Metadata built here (not in the fixture) so its msgpack writer
         * is under injection too. */
        meta.len = 0;
        mh_mpw_t mw;
        mh_mpw_init(&mw, &meta);
        mh_mpw_map(&mw, 2);
        mh_mpw_cstr(&mw, "agent_id");
        mh_mpw_cstr(&mw, "agent-7");
        mh_mpw_cstr(&mw, "metadata");
        mh_mpw_map(&mw, 1);
        mh_mpw_cstr(&mw, "k");
        mh_mpw_int(&mw, k);
        if (mw.err) {
            w.err = w.err ? w.err : mw.err;
            break;
        }
        mh_packw_commit(&w, S(F.cids[k].s), k ? S(F.cids[k - 1].s) : NIL, NIL, S(F.sids[k].s), S(F.msgs[k]),
                        S("gabriel"), S(F.times[k]), S("main"), meta.p, meta.len);
    }
    mh_packw_snapshots(&w, NCOMMITS);
    for (int k = 0; k < NCOMMITS; k++)
        mh_packw_snapshot(&w, S(F.sids[k].s), k ? S(F.sids[k - 1].s) : NIL, F.ups[k].p, F.ups[k].len, F.rms[k].p,
                          F.rms[k].len);
    mh_packw_blobs(&w, (uint32_t)F.nblobs);
    for (size_t i = 0; i < F.nblobs; i++)
        mh_packw_blob(&w, S(F.blob_ids[i].s), F.contents[i], strlen(F.contents[i]));
    mh_packw_branch_heads(&w, 1);
    mh_packw_branch_head(&w, S("main"), S(F.cids[NCOMMITS - 1].s));
    int rc = mh_packw_finish(&w);
    if (!rc) digest_buf(&out, d);
    if (!rc && !F.pack.p) {
        /* The baseline keeps its pack for the readers, and a copy whose
         * commits[3].snapshot_id gets an upper-case digit. */
        rc = mh_buf_append(&F.bad_pack, out.p, out.len);
        uint8_t *hit = rc ? NULL : memmem(F.bad_pack.p, F.bad_pack.len, F.sids[3].s, MH_ID_LEN);
        if (hit) hit[10] = 'X';
        else rc = MH_EINVAL;
        F.pack = out;
        out = (mh_buf_t){0};
    }
    mh_buf_free(&out);
    mh_buf_free(&meta);
    return rc;
}

/* The pack reader, blob verification and commit metadata. */
static int wl_pack_read(uint8_t d[32])
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_pack_t p;
    const char *why = NULL;
    mh_buf_t acc = {0}, meta = {0};
    int rc = mh_pack_read(&a, F.pack.p, F.pack.len, &mh_pack_limits_default, &p, &why);
    if (!rc) {
        size_t bad = 0;
        rc = mh_pack_verify_blobs(F.pack.p, &p, &bad);
    }
    for (size_t i = 0; !rc && i < p.ncommits; i++) {
        uint32_t n = 0;
        meta.len = 0;
        rc = mh_pack_commit_meta(&p.commits[i], &meta, &n);
        if (!rc) rc = mh_buf_append(&acc, p.commits[i].commit_id.p, p.commits[i].commit_id.n);
        if (!rc) rc = mh_buf_append(&acc, meta.p, meta.len);
    }
    for (size_t i = 0; !rc && i < p.nblobs; i++) rc = mh_buf_printf(&acc, "%llu:%llu,", (unsigned long long)p.blobs[i].offset,
                                                                     (unsigned long long)p.blobs[i].length);
    if (!rc) rc = mh_buf_printf(&acc, "%zu/%zu/%zu", p.ncommits, p.nsnapshots, p.nblobs);
    if (!rc) digest_buf(&acc, d);
    mh_buf_free(&acc);
    mh_buf_free(&meta);
    mh_arena_release(&a);
    return rc;
}

/* msgpack decode of the pack body, re-encoded as msgpack and as JSON. */
static int wl_msgpack(uint8_t d[32])
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_val_t v;
    const char *why = NULL;
    mh_buf_t mp = {0}, js = {0};
    int rc = mh_msgpack_decode(&a, F.pack.p + 5, F.pack.len - 5, NULL, &v, &why);
    if (!rc) rc = mh_encode(&v, MH_FMT_MSGPACK, &mp);
    if (!rc) rc = mh_encode(&v, MH_FMT_JSON, &js);
    if (!rc) rc = mh_buf_append(&mp, js.p, js.len);
    if (!rc) digest_buf(&mp, d);
    if (!rc && !F.json.p) {
        F.json = js;
        js = (mh_buf_t){0};
    }
    mh_buf_free(&mp);
    mh_buf_free(&js);
    mh_arena_release(&a);
    return rc;
}

/* JSON decode (jansson, then our conversion into the arena), re-encoded. */
static int wl_json(uint8_t d[32])
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_val_t v;
    const char *why = NULL;
    mh_buf_t out = {0};
    int rc = mh_json_decode(&a, F.json.p, F.json.len, NULL, &v, &why);
    if (!rc) rc = mh_encode(&v, MH_FMT_JSON, &out);
    if (!rc) rc = mh_encode(&v, MH_FMT_MSGPACK, &out);
    if (!rc) digest_buf(&out, d);
    mh_buf_free(&out);
    mh_arena_release(&a);
    return rc;
}

/* Building a response value and encoding it; a failed encode must leave
 * the output exactly as it was. */
static int wl_encode(uint8_t d[32])
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_buf_t out = {0};
    int rc = mh_buf_append(&out, "prefix", 6);
    mh_val_t *m = rc ? NULL : mh_v_map(&a);
    mh_val_t *arr = m ? mh_v_arr(&a) : NULL;
    if (!rc && (!m || !arr)) rc = MH_ENOMEM;
    for (int i = 0; !rc && i < 40; i++) {
        char *s = mh_sprintf(&a, "item-%d-\xc3\xa9", i);
        rc = s ? mh_arr_push(&a, arr, mh_v_str(s)) : MH_ENOMEM;
        if (!rc) rc = mh_arr_push(&a, arr, mh_v_int(-i));
        if (!rc) rc = mh_arr_push(&a, arr, mh_v_bin(F.contents[i % NFILES], 8));
    }
    if (!rc) rc = mh_map_put(&a, m, "items", mh_v_ref(arr));
    if (!rc) rc = mh_map_put(&a, m, "ok", mh_v_bool(true));
    if (!rc) rc = mh_map_put(&a, m, "nil", mh_v_nil());
    if (!rc) rc = mh_map_put(&a, m, "f", mh_v_float(1.5));
    for (int fmt = 0; !rc && fmt < 2; fmt++) {
        size_t before = out.len;
        rc = mh_encode(m, fmt ? MH_FMT_MSGPACK : MH_FMT_JSON, &out);
        if (rc && out.len != before) rc = MH_EINVAL; /* would be a wrong result */
    }
    if (!rc) digest_buf(&out, d);
    mh_buf_free(&out);
    mh_arena_release(&a);
    return rc;
}

/* The manifest delta chain, as a push rebuilds it: decode each delta,
 * apply it, check the id; clone, diff and re-apply every third step;
 * finally encode the last manifest and decode it back. */
static int wl_manifest(uint8_t d[32])
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_manifest_t m = {0}, c = {0}, back = {0};
    mh_buf_t up = {0}, rm = {0}, enc = {0}, ids = {0};
    int rc = 0;
    for (int k = 0; !rc && k < NCOMMITS; k++) {
        mh_val_t u, r;
        const char *why = NULL;
        rc = mh_msgpack_decode(&a, F.ups[k].p, F.ups[k].len, NULL, &u, &why);
        if (!rc) rc = mh_msgpack_decode(&a, F.rms[k].p, F.rms[k].len, NULL, &r, &why);
        if (!rc) rc = mh_manifest_apply(&m, &u, &r, &why);
        if (rc) break;
        mh_id_t id;
        mh_manifest_id(&m, &id);
        if (strcmp(id.s, F.sids[k].s) != 0) {
            rc = MH_EHASH; /* a wrong result, not a clean error */
            break;
        }
        rc = mh_buf_append(&ids, id.s, MH_ID_LEN);
        if (!rc && k % 3 == 2) {
            /* clone, then rebuild the clone from the previous step's
             * manifest by diff + apply: the id must be the same */
            uint32_t nu, nr;
            up.len = rm.len = 0;
            rc = mh_manifest_clone(&c, &m);
            if (!rc) rc = mh_manifest_diff(&c, &m, &up, &nu, &rm, &nr);
            mh_id_t cid;
            if (!rc) {
                mh_manifest_id(&c, &cid);
                if (strcmp(cid.s, id.s) != 0) rc = MH_EHASH;
            }
            if (!rc && (nu || nr)) rc = MH_EHASH; /* a clone differs from nothing */
        }
    }
    if (!rc) rc = mh_manifest_encode(&m, &enc);
    if (!rc) rc = mh_manifest_decode(&a, enc.p, enc.len, &back);
    if (!rc) {
        mh_id_t id;
        mh_manifest_id(&back, &id);
        if (strcmp(id.s, F.sids[NCOMMITS - 1].s) != 0) rc = MH_EHASH;
    }
    if (!rc) digest_buf(&ids, d);
    mh_manifest_free(&m);
    mh_manifest_free(&c);
    mh_manifest_free(&back);
    mh_buf_free(&up);
    mh_buf_free(&rm);
    mh_buf_free(&enc);
    mh_buf_free(&ids);
    mh_arena_release(&a);
    return rc;
}

/* The reader on a pack whose commits[3].snapshot_id is not an id: the
 * error path (with its message built in the arena) under injection. */
static int wl_pack_read_bad(uint8_t d[32])
{
    (void)d;
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_pack_t p;
    const char *why = NULL;
    int rc = mh_pack_read(&a, F.bad_pack.p, F.bad_pack.len, &mh_pack_limits_default, &p, &why);
    mh_arena_release(&a);
    return rc;
}

/* A delta that removes an absent path must fail with MH_ENOENT and leave
 * the manifest as it was. */
static int wl_manifest_bad(uint8_t d[32])
{
    (void)d;
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_manifest_t m = {0};
    mh_val_t u, r;
    const char *why = NULL;
    int rc = mh_msgpack_decode(&a, F.ups[0].p, F.ups[0].len, NULL, &u, &why);
    if (!rc) rc = mh_manifest_apply(&m, &u, NULL, &why);
    mh_id_t before, after;
    mh_manifest_id(&m, &before);
    /* delta 2 removes new/1.txt, which the root manifest does not have */
    if (!rc) rc = mh_msgpack_decode(&a, F.rms[2].p, F.rms[2].len, NULL, &r, &why);
    if (!rc) {
        rc = mh_manifest_apply(&m, NULL, &r, &why);
        mh_manifest_id(&m, &after);
        if (rc == MH_ENOENT && strcmp(before.s, after.s) != 0) rc = MH_EINVAL; /* changed: wrong */
    }
    mh_manifest_free(&m);
    mh_arena_release(&a);
    return rc;
}

/* ============================================================== loops */

static bool leak_check(void)
{
#ifdef __SANITIZE_ADDRESS__
    return __lsan_do_recoverable_leak_check() == 0;
#else
    return true;
#endif
}

/* Runs `fn` under injection for N = 1, 2, ... (see the file comment) and
 * reports one TAP line per mode, plus details of the first bad runs. */
static void fault_loop(const char *name, workload_fn fn, int base_rc, const uint8_t base[32], bool persist)
{
    uint64_t n, bad = 0, recovered = 0, enomem = 0;
    bool finished = false;
    for (n = 1; n <= MAX_N; n++) {
        uint8_t d[32];
        mh_failalloc_arm(n, persist);
        int rc = fn(d);
        uint64_t failed = mh_failalloc_failed();
        mh_failalloc_disarm();
        const char *what = NULL;
        if (rc == 0 && base_rc == 0 && memcmp(d, base, 32) != 0) what = "succeeded with a wrong result";
        else if (rc != base_rc && rc != MH_ENOMEM) what = mh_strerror(rc);
        else if (rc != base_rc && failed == 0) what = "ended differently without an injected failure";
        if (what) {
            if (bad++ < 5)
                printf("# %s (%s): N=%llu: %s (rc %d)\n", name, persist ? "persistent" : "one-shot",
                       (unsigned long long)n, what, rc);
        } else if (rc == base_rc && failed) {
            recovered++;
        } else if (rc == MH_ENOMEM) {
            enomem++;
        }
        if (failed == 0) {
            finished = true;
            break;
        }
    }
    TAP_OK(finished && bad == 0,
           "%s, %s: %llu runs, each ended in the baseline result or MH_ENOMEM (%llu MH_ENOMEM, %llu as without "
           "injection)",
           name, persist ? "persistent" : "one-shot", (unsigned long long)n, (unsigned long long)enomem,
           (unsigned long long)recovered);
    TAP_OK(leak_check(), "%s, %s: no leak", name, persist ? "persistent" : "one-shot");
}

/* `want` is the result of the unarmed run: 0, or the clean error a bad
 * input must give (under injection it may also become MH_ENOMEM). */
static void run(const char *name, workload_fn fn, int want)
{
    uint8_t base[32] = {0};
    mh_failalloc_disarm();
    int rc = fn(base);
    TAP_EQ_INT(rc, want, name);
    if (rc != want) return;
    if (!mh_failalloc_enabled()) return;
    fault_loop(name, fn, want, base, false);
    fault_loop(name, fn, want, base, true);
}

/* ======================================================= the hook itself */

static void test_hook(void)
{
    if (!mh_failalloc_enabled()) {
        TAP_OK(mh_failalloc_count() == 0 && mh_failalloc_failed() == 0, "stubs: nothing counted without FAILALLOC=1");
        TAP_COMMENT("built without FAILALLOC=1: baselines only (make unit-failalloc runs the fault loops)");
        return;
    }
    /* volatile: the compiler must not drop or merge these calls. */
    void *volatile p[5];
    mh_failalloc_arm(3, false);
    for (int i = 0; i < 5; i++) p[i] = malloc(16);
    TAP_OK(p[0] && p[1] && !p[2] && p[3] && p[4], "one-shot: only the 3rd malloc fails");
    TAP_EQ_INT(mh_failalloc_count(), 5, "five allocations counted");
    TAP_EQ_INT(mh_failalloc_failed(), 1, "one failure injected");
    for (int i = 0; i < 5; i++) free(p[i]);

    mh_failalloc_arm(2, true);
    for (int i = 0; i < 4; i++) p[i] = calloc(1, 16);
    TAP_OK(p[0] && !p[1] && !p[2] && !p[3], "persistent: the 2nd calloc and every later one fail");
    mh_failalloc_disarm();
    free(p[0]);

    char *volatile q = malloc(8);
    memcpy(q, "abcdefg", 8);
    mh_failalloc_arm(1, false);
    char *volatile r = realloc(q, 1 << 20);
    mh_failalloc_disarm();
    TAP_OK(!r && !strcmp(q, "abcdefg"), "a failed realloc leaves the block intact");
    free(q);

    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_failalloc_arm(1, false);
    void *volatile x = mh_alloc(&a, 8);
    int drc = mh_arena_defer(&a, free, NULL);
    mh_failalloc_disarm();
    TAP_OK(!x && drc == 0, "mh_alloc is counted (and fails when its number comes up)");
    mh_failalloc_arm(1, false);
    drc = mh_arena_defer(&a, free, NULL);
    char *s = mh_sprintf(&a, "%d", 42);
    mh_failalloc_disarm();
    TAP_OK(drc == MH_ENOMEM && s && !strcmp(s, "42"), "mh_arena_defer fails with MH_ENOMEM; mh_sprintf still works");
    mh_arena_release(&a);
    mh_failalloc_arm(0, false);
    p[0] = malloc(1);
    TAP_OK(p[0] && mh_failalloc_count() == 1, "n = 0 counts without failing");
    mh_failalloc_disarm();
    free(p[0]);
}

int main(void)
{
    test_hook();
    mh_failalloc_disarm();
    TAP_EQ_INT(fixture_init(), 0, "fixture: a history of 12 commits over 16 files");
    run("pack writer", wl_pack_write, 0); /* first: keeps the pack for the readers */
    run("pack reader + verify + metadata", wl_pack_read, 0);
    run("pack reader, a bad id in commits[3] (MH_EPARSE)", wl_pack_read_bad, MH_EPARSE);
    run("msgpack decode + encode", wl_msgpack, 0); /* keeps the JSON text */
    run("JSON decode + encode", wl_json, 0);
    run("value building + encode (output unchanged on failure)", wl_encode, 0);
    run("manifest chain: apply, id, clone, diff, encode, decode", wl_manifest, 0);
    run("manifest delta removing an absent path (MH_ENOENT, unchanged)", wl_manifest_bad, MH_ENOENT);
    fixture_free();
    return tap_done();
}
