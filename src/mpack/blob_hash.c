/*
 * blob_hash.c — the stream reader's blob hasher on a second thread
 * (mpack_internal.h, mh__bhash_*; used with MH_PACKR_PARALLEL).
 *
 * Reading a v2 pack with MH_PACKR_VERIFY is two passes of CPU over every
 * blob byte: zstd decompression, then SHA-256. On one thread they run one
 * after the other (libuv's history: 289 MB of blobs, ~300 ms of
 * decompression and ~180 ms of hashing). Here the reader's thread only
 * decompresses: the decompressed bytes are copied into a ring of chunk
 * buffers and this module's thread hashes them, split at the frames'
 * blob lengths, while the next bytes are decompressed.
 *
 * The queue carries, in stream order, frame starts (a copy of the
 * frame's blob ids and lengths: the reader's blob array may move when it
 * grows) and data chunks. The reader blocks only when every chunk buffer
 * is queued (bounded memory: BH_NBUF x BH_CHUNK) or the queue is full.
 * The first mismatch is recorded (frame, blob, id) and the rest of the
 * work is skipped; the reader learns it at its next hand-over (so it
 * stops decompressing soon after) and, because a mismatch always lies
 * before the reader's position, reports it ahead of any error of its own
 * (pack_stream.c, hash_first): the verdict and the message are the ones a
 * single-threaded read gives.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "mpack_internal.h"

#define BH_CHUNK ((size_t)256 << 10)
#define BH_NBUF 8
#define BH_QCAP 64

typedef struct bh_frame {
    size_t idx;
    uint32_t n;
    mh_packr_blob_t b[];
} bh_frame_t;

typedef struct {
    bh_frame_t *frame; /* a frame start, or NULL */
    int buf;           /* a data chunk (index into bufs), or -1 */
    size_t len;
} bh_item_t;

struct mh__bhash {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* any change: work queued, work done, stop */
    bh_item_t q[BH_QCAP];
    unsigned qhead, qlen;
    bool working; /* the thread holds an item */
    bool stop;
    uint8_t *bufs[BH_NBUF];
    bool busy[BH_NBUF]; /* queued or being hashed */
    /* The reader's side: the chunk being filled. */
    int fill;
    size_t fill_len;
    size_t frames_mem; /* bytes of the frame copies queued and current (under mu) */
    /* The thread's side. */
    bh_frame_t *cur_frame;
    mh__bcur_t bc;
    /* The verdict (under mu). */
    bool bad;
    mh__bhash_bad_t why;
};

static size_t frame_mem(const bh_frame_t *f)
{
    return sizeof *f + (size_t)f->n * sizeof f->b[0];
}

static const uint8_t sha_empty[32] = {0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4,
                                      0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b,
                                      0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55};

/* ------------------------------------------------------- the blob cursor */

/* Past the empty blobs at the cursor (each against the empty digest);
 * starts hashing the next blob with bytes. */
static bool settle(mh__bcur_t *c)
{
    while (c->cur < c->n && c->b[c->cur].length == 0) {
        if (memcmp(c->b[c->cur].id, sha_empty, 32) != 0) return false;
        c->cur++;
    }
    if (c->cur < c->n) {
        c->left = c->b[c->cur].length;
        SHA256_Init(&c->sha);
    }
    return true;
}

bool mh__bcur_start(mh__bcur_t *c, const mh_packr_blob_t *b, uint32_t n)
{
    c->b = b;
    c->n = n;
    c->cur = 0;
    c->left = 0;
    return settle(c);
}

bool mh__bcur_feed(mh__bcur_t *c, const uint8_t *p, size_t n)
{
    while (n) {
        if (c->cur >= c->n) return false; /* past the last blob */
        size_t take = c->left < n ? (size_t)c->left : n;
        SHA256_Update(&c->sha, p, take);
        p += take;
        n -= take;
        c->left -= take;
        if (c->left == 0) {
            uint8_t got[32];
            SHA256_Final(got, &c->sha);
            if (memcmp(got, c->b[c->cur].id, 32) != 0) return false;
            c->cur++;
            if (!settle(c)) return false;
        }
    }
    return true;
}

/* ------------------------------------------------------- the thread's side */

/* The current blob did not hash to its id: what the reader reports. */
static bool mismatch(mh__bhash_t *h, mh__bhash_bad_t *out)
{
    out->frame_idx = h->cur_frame->idx;
    out->blob = h->bc.cur;
    memcpy(out->id, h->cur_frame->b[h->bc.cur].id, 32);
    return false;
}

static void *bh_main(void *arg)
{
    mh__bhash_t *h = arg;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (!h->stop && h->qlen == 0) pthread_cond_wait(&h->cv, &h->mu);
        if (h->qlen == 0) break; /* stopped with nothing left */
        bh_item_t it = h->q[h->qhead];
        h->qhead = (h->qhead + 1) % BH_QCAP;
        h->qlen--;
        h->working = true;
        bool skip = h->bad || h->stop;
        bh_frame_t *old = NULL;
        if (it.frame) { /* swapped under the lock: mh__bhash_mem counts it */
            old = h->cur_frame;
            h->cur_frame = it.frame;
            if (old) h->frames_mem -= frame_mem(old);
        }
        pthread_mutex_unlock(&h->mu);

        bool ok = true;
        mh__bhash_bad_t why;
        free(old);
        if (it.frame && !skip && !mh__bcur_start(&h->bc, it.frame->b, it.frame->n)) ok = mismatch(h, &why);
        /* bytes past the last blob cannot come: the reader checked that
         * the lengths add up to the frame's size and stops past it */
        if (ok && it.buf >= 0 && !skip && !mh__bcur_feed(&h->bc, h->bufs[it.buf], it.len) && h->bc.cur < h->bc.n)
            ok = mismatch(h, &why);

        pthread_mutex_lock(&h->mu);
        if (it.buf >= 0) h->busy[it.buf] = false;
        if (!ok && !h->bad) {
            h->bad = true;
            h->why = why;
        }
        h->working = false;
        pthread_cond_broadcast(&h->cv);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

/* ------------------------------------------------------- the reader's side */

int mh__bhash_new(mh__bhash_t **out)
{
    *out = NULL;
    mh__bhash_t *h = calloc(1, sizeof *h);
    if (!h) return MH_ENOMEM;
    h->fill = -1;
    for (int i = 0; i < BH_NBUF; i++)
        if (!(h->bufs[i] = malloc(BH_CHUNK))) goto fail;
    if (pthread_mutex_init(&h->mu, NULL)) goto fail;
    if (pthread_cond_init(&h->cv, NULL)) {
        pthread_mutex_destroy(&h->mu);
        goto fail;
    }
    if (pthread_create(&h->th, NULL, bh_main, h)) {
        pthread_cond_destroy(&h->cv);
        pthread_mutex_destroy(&h->mu);
        goto fail;
    }
    *out = h;
    return 0;
fail:
    for (int i = 0; i < BH_NBUF; i++) free(h->bufs[i]);
    free(h);
    return MH_ENOMEM;
}

/* Queues an item, waiting for room (mu held). */
static void enqueue(mh__bhash_t *h, bh_frame_t *frame, int buf, size_t len)
{
    while (h->qlen == BH_QCAP) pthread_cond_wait(&h->cv, &h->mu);
    h->q[(h->qhead + h->qlen) % BH_QCAP] = (bh_item_t){frame, buf, len};
    h->qlen++;
    if (frame) h->frames_mem += frame_mem(frame);
    pthread_cond_broadcast(&h->cv);
}

/* Queues the chunk being filled, if any (mu held). */
static void flush(mh__bhash_t *h)
{
    if (h->fill < 0) return;
    if (h->fill_len) enqueue(h, NULL, h->fill, h->fill_len);
    else h->busy[h->fill] = false;
    h->fill = -1;
    h->fill_len = 0;
}

int mh__bhash_frame(mh__bhash_t *h, size_t frame_idx, const mh_packr_blob_t *blobs, uint32_t n)
{
    bh_frame_t *f = malloc(sizeof *f + (size_t)n * sizeof f->b[0]);
    if (!f) return MH_ENOMEM;
    f->idx = frame_idx;
    f->n = n;
    memcpy(f->b, blobs, (size_t)n * sizeof *blobs);
    pthread_mutex_lock(&h->mu);
    flush(h);
    enqueue(h, f, -1, 0);
    bool bad = h->bad;
    pthread_mutex_unlock(&h->mu);
    return bad ? MH_EHASH : 0;
}

int mh__bhash_data(mh__bhash_t *h, const uint8_t *p, size_t n)
{
    while (n) {
        if (h->fill < 0) {
            pthread_mutex_lock(&h->mu);
            for (;;) {
                if (h->bad) {
                    pthread_mutex_unlock(&h->mu);
                    return MH_EHASH;
                }
                for (int i = 0; i < BH_NBUF && h->fill < 0; i++)
                    if (!h->busy[i]) h->fill = i;
                if (h->fill >= 0) break;
                pthread_cond_wait(&h->cv, &h->mu);
            }
            h->busy[h->fill] = true;
            h->fill_len = 0;
            pthread_mutex_unlock(&h->mu);
        }
        size_t take = BH_CHUNK - h->fill_len < n ? BH_CHUNK - h->fill_len : n;
        memcpy(h->bufs[h->fill] + h->fill_len, p, take);
        h->fill_len += take;
        p += take;
        n -= take;
        if (h->fill_len == BH_CHUNK) {
            pthread_mutex_lock(&h->mu);
            flush(h);
            pthread_mutex_unlock(&h->mu);
        }
    }
    return 0;
}

bool mh__bhash_sync(mh__bhash_t *h, mh__bhash_bad_t *bad)
{
    pthread_mutex_lock(&h->mu);
    flush(h);
    while (h->qlen || h->working) pthread_cond_wait(&h->cv, &h->mu);
    bool b = h->bad;
    if (b && bad) *bad = h->why;
    pthread_mutex_unlock(&h->mu);
    return b;
}

size_t mh__bhash_mem(mh__bhash_t *h)
{
    pthread_mutex_lock(&h->mu);
    size_t m = sizeof *h + BH_NBUF * BH_CHUNK + h->frames_mem;
    pthread_mutex_unlock(&h->mu);
    return m;
}

void mh__bhash_free(mh__bhash_t *h)
{
    if (!h) return;
    pthread_mutex_lock(&h->mu);
    h->stop = true; /* what is queued is skipped, its memory freed */
    if (h->fill >= 0) h->busy[h->fill] = false;
    h->fill = -1;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    pthread_join(h->th, NULL);
    free(h->cur_frame);
    pthread_cond_destroy(&h->cv);
    pthread_mutex_destroy(&h->mu);
    for (int i = 0; i < BH_NBUF; i++) free(h->bufs[i]);
    free(h);
}
