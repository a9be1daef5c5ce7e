/*
 * codec_internal.h — helpers shared by the codec's .c files only.
 */
#ifndef MH_CODEC_INTERNAL_H
#define MH_CODEC_INTERNAL_H

#include "mh/codec.h"

/* One UTF-8 step; see utf8.c. */
bool mh__utf8_step(const uint8_t *p, size_t n, size_t *adv);

/* Slots allocated for an array/map of n items. Every ARR/MAP node, decoded
 * or built, has exactly this capacity, which is how mh_arr_push/mh_map_put
 * know when to grow without a capacity field in mh_val_t: 0, then 4, then
 * the next power of two. */
static inline size_t mh_val_cap(size_t n)
{
    if (n == 0) return 0;
    if (n <= 4) return 4;
    size_t c = 8;
    while (c < n) c <<= 1;
    return c;
}

#endif
