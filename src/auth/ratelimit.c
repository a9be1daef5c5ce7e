/*
 * ratelimit.c — per-process token buckets (include/mh/auth.h): a bucket
 * per key (an identity id or a client address) holding up to one minute's
 * budget, refilled continuously.
 *
 * Invariants:
 *  - Open addressing with linear probing; keys are copied into the entry
 *    (bounded length), the table never holds more than max_keys entries
 *    and never more than 3/4 full, so probes terminate.
 *  - A bucket that has refilled completely is indistinguishable from a
 *    missing one, so sweeps may drop it at any time: that is what bounds
 *    memory under many distinct clients.
 *  - Token arithmetic is in micro-tokens (integers): no floating-point
 *    drift, and a rate of 1/minute still refills smoothly.
 */
#include <stdlib.h>
#include <string.h>

#include "mh/auth.h"

#define KEY_MAX 80          /* an identity id (71) or an IP address text */
#define UNIT 1000000ull     /* micro-tokens per token */

typedef struct {
    char key[KEY_MAX]; /* "" = empty slot */
    uint64_t tokens;   /* micro-tokens */
    uint64_t at_ms;    /* when `tokens` was computed */
} bucket_t;

struct mh_ratelimit {
    uint32_t per_minute;
    uint32_t max_keys;
    uint64_t cap;      /* micro-tokens in a full bucket */
    bucket_t *t;
    uint32_t size;     /* power of two */
    uint32_t used;
};

/* Keys are addresses and identities: a client picks its IPv6 address
 * from a whole /64, so the table hashes with core's seeded hash. */
static uint64_t hash_key(const char *k) { return mh_hash64(k, strlen(k)); }

mh_ratelimit_t *mh_ratelimit_new(uint32_t per_minute, uint32_t max_keys)
{
    mh_ratelimit_t *rl = calloc(1, sizeof *rl);
    if (!rl) return NULL;
    rl->per_minute = per_minute;
    rl->max_keys = max_keys ? max_keys : 65536;
    rl->cap = (uint64_t)per_minute * UNIT;
    return rl;
}

void mh_ratelimit_free(mh_ratelimit_t *rl)
{
    if (!rl) return;
    free(rl->t);
    free(rl);
}

/* Tokens of b at now (refilled, capped). */
static uint64_t level(const mh_ratelimit_t *rl, const bucket_t *b, uint64_t now_ms)
{
    uint64_t dt = now_ms > b->at_ms ? now_ms - b->at_ms : 0;
    /* per_minute tokens per 60000 ms = per_minute * UNIT / 60000 micro-tokens per ms */
    uint64_t add = dt >= 60000 ? rl->cap : dt * rl->per_minute * (UNIT / 1000) / 60;
    uint64_t v = b->tokens + add;
    return v > rl->cap ? rl->cap : v;
}

static int rebuild(mh_ratelimit_t *rl, uint32_t size, uint64_t now_ms, bool keep_full)
{
    bucket_t *nt = calloc(size, sizeof *nt);
    if (!nt) return MH_ENOMEM;
    uint32_t used = 0;
    for (uint32_t i = 0; rl->t && i < rl->size; i++) {
        bucket_t *b = &rl->t[i];
        if (!b->key[0]) continue;
        if (!keep_full && level(rl, b, now_ms) >= rl->cap) continue; /* refilled: no state */
        uint32_t j = (uint32_t)hash_key(b->key) & (size - 1);
        while (nt[j].key[0]) j = (j + 1) & (size - 1);
        nt[j] = *b;
        used++;
    }
    free(rl->t);
    rl->t = nt;
    rl->size = size;
    rl->used = used;
    return 0;
}

/* Makes room for one more entry: sweep refilled buckets, grow up to
 * max_keys, and as a last resort reset everything (fail open). */
static int make_room(mh_ratelimit_t *rl, uint64_t now_ms)
{
    if (rl->t && (uint64_t)(rl->used + 1) * 4 <= (uint64_t)rl->size * 3 && rl->used < rl->max_keys) return 0;
    if (rl->t && rebuild(rl, rl->size, now_ms, false)) return MH_ENOMEM;
    if (rl->t && (uint64_t)(rl->used + 1) * 4 <= (uint64_t)rl->size * 3 && rl->used < rl->max_keys) return 0;
    if (rl->used >= rl->max_keys) {
        mh_warn("rate limiter: %u active clients, the maximum; resetting the buckets", rl->used);
        free(rl->t);
        rl->t = NULL;
        rl->size = rl->used = 0;
    }
    uint32_t size = rl->size ? rl->size * 2 : 64;
    while ((uint64_t)(rl->used + 1) * 4 > (uint64_t)size * 3) size *= 2;
    return rebuild(rl, size, now_ms, true);
}

uint32_t mh_ratelimit_take(mh_ratelimit_t *rl, const char *key, uint64_t now_ms)
{
    if (!rl || rl->per_minute == 0) return 0;
    char k[KEY_MAX];
    size_t kl = strlen(key);
    if (kl >= KEY_MAX) kl = KEY_MAX - 1;
    memcpy(k, key, kl);
    k[kl] = 0;
    if (!k[0]) {
        k[0] = '?';
        k[1] = 0;
    }
    bucket_t *b = NULL;
    if (rl->t) {
        uint32_t j = (uint32_t)hash_key(k) & (rl->size - 1);
        while (rl->t[j].key[0]) {
            if (!strcmp(rl->t[j].key, k)) {
                b = &rl->t[j];
                break;
            }
            j = (j + 1) & (rl->size - 1);
        }
    }
    if (!b) {
        if (make_room(rl, now_ms)) return 0; /* out of memory: fail open */
        uint32_t j = (uint32_t)hash_key(k) & (rl->size - 1);
        while (rl->t[j].key[0]) j = (j + 1) & (rl->size - 1);
        b = &rl->t[j];
        memcpy(b->key, k, kl + 1);
        b->tokens = rl->cap;
        b->at_ms = now_ms;
        rl->used++;
    }
    uint64_t v = level(rl, b, now_ms);
    b->at_ms = now_ms;
    if (v >= UNIT) {
        b->tokens = v - UNIT;
        return 0;
    }
    b->tokens = v;
    /* Time until one whole token: (UNIT - v) micro-tokens at
     * per_minute * UNIT / 60 micro-tokens per second, rounded up. */
    uint64_t rate_per_s = (uint64_t)rl->per_minute * UNIT / 60;
    if (!rate_per_s) rate_per_s = 1;
    uint64_t secs = (UNIT - v + rate_per_s - 1) / rate_per_s;
    return secs ? (uint32_t)secs : 1;
}
