/*
 * tap.h — a minimal TAP producer for the C unit tests: each test program
 * prints "ok N - name" / "not ok N - name" lines and a plan at the end;
 * tap_done() returns the process exit status (0 when all passed).
 */
#ifndef MH_TAP_H
#define MH_TAP_H

#include <ftw.h>
#include <stdio.h>
#include <string.h>

static int tap_n, tap_failed;

#define TAP_OK(cond, ...)                                                     \
    do {                                                                      \
        int tap_c_ = (cond) ? 1 : 0;                                          \
        printf("%sok %d - ", tap_c_ ? "" : "not ", ++tap_n);                  \
        printf(__VA_ARGS__);                                                  \
        printf("\n");                                                         \
        if (!tap_c_) {                                                        \
            tap_failed++;                                                     \
            printf("#   failed at %s:%d\n", __FILE__, __LINE__);              \
        }                                                                     \
        fflush(stdout);                                                       \
    } while (0)

#define TAP_EQ_INT(a, b, name)                                                \
    do {                                                                      \
        long long tap_a_ = (long long)(a), tap_b_ = (long long)(b);           \
        TAP_OK(tap_a_ == tap_b_, "%s", name);                                 \
        if (tap_a_ != tap_b_) printf("#   got %lld, want %lld\n", tap_a_, tap_b_); \
    } while (0)

#define TAP_EQ_STR(a, b, name)                                                \
    do {                                                                      \
        const char *tap_a_ = (a), *tap_b_ = (b);                              \
        int tap_eq_ = tap_a_ && tap_b_ && strcmp(tap_a_, tap_b_) == 0;        \
        TAP_OK(tap_eq_, "%s", name);                                          \
        if (!tap_eq_) printf("#   got '%s', want '%s'\n", tap_a_ ? tap_a_ : "(null)", tap_b_ ? tap_b_ : "(null)"); \
    } while (0)

#define TAP_COMMENT(...)                                                      \
    do {                                                                      \
        printf("# ");                                                         \
        printf(__VA_ARGS__);                                                  \
        printf("\n");                                                         \
        fflush(stdout);                                                       \
    } while (0)

static inline int tap_done(void)
{
    printf("1..%d\n", tap_n);
    if (tap_failed) printf("# %d of %d failed\n", tap_failed, tap_n);
    return tap_failed ? 1 : 0;
}

/* Removes the directory tree at root (a test's scratch directory),
 * deepest entries first, without following symlinks. */
static int tap__rm_cb(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(p);
}
static inline void tap_rm_tree(const char *root) { nftw(root, tap__rm_cb, 16, FTW_DEPTH | FTW_PHYS); }

#endif
