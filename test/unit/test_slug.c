/*
 * test_slug.c — repository slugs (SPEC 4.1) and branch names.
 */
#include <string.h>

#include "mh/hub.h"
#include "mh/refwrite.h"
#include "tap.h"

int main(void)
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    static const struct {
        const char *name, *slug;
    } cases[] = {
        {"demo", "demo"},
        {"My Repo", "my-repo"},
        {"My Repo!!", "my-repo-"},
        {"  lead", "-lead"},
        {"a..b_c-d", "a..b_c-d"},
        {"ÄÖÜ", "-"},                 /* every non-ASCII byte is outside the set: one run */
        {"x/y\\z", "x-y-z"},
        {"MIXED.Case_9", "mixed.case_9"},
        {"tab\there", "tab-here"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *s = mh_repo_slug(&a, cases[i].name, strlen(cases[i].name));
        TAP_EQ_STR(s, cases[i].slug, cases[i].name);
    }
    /* SPEC 4.1: empty, ".", ".." and a leading "." are refused (issue 15
     * item 10); the slug of such names is what is checked. */
    static const struct {
        const char *name;
        bool ok;
    } valid[] = {{"demo", true}, {"-lead", true}, {"a..b", true}, {"x.", true}, {"", false}, {".", false},
                 {"..", false}, {".hidden", false}, {"...", false}, {".git", false}};
    for (size_t i = 0; i < sizeof valid / sizeof valid[0]; i++) {
        char *s = mh_repo_slug(&a, valid[i].name, strlen(valid[i].name));
        TAP_OK(mh_repo_slug_valid(s) == valid[i].ok, "slug of '%s' is %s", valid[i].name,
               valid[i].ok ? "valid" : "refused");
    }
    TAP_OK(!mh_repo_slug_valid(NULL), "NULL slug refused");
    /* SPEC 4.2: one rule for branch and tag names (git's ref-name rules). */
    static const char *good[] = {"main", "feature/x-1", "v1.0.0", "release/2024.1", "a.lock.b", "x/y.locked",
                                 "a@b", "@", "x/a.b/c", "UPPER_case-9", "a#b", "{braces}"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        TAP_OK(mh_ref_name_valid(good[i], strlen(good[i])), "ref name '%s' is valid", good[i]);
    static const char *bad[] = {"",       "/a",       "a/",      ".a",      "a.",     "a..b",      "a//b",  "a b",
                                "a~b",    "a:b",      "a\\b",   "a*b",     "a^b",    "a?b",       "a[b",   "a@{b",
                                "@{",     "x/.hidden", "a/.b/c", "x.lock",  "a/b.lock", "a.lock/b", ".lock", "a\tb",
                                "a\x7f", "caf\xc3\xa9", "a\nb"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        TAP_OK(!mh_ref_name_valid(bad[i], strlen(bad[i])), "refused ref name '%s'", bad[i]);
    TAP_OK(!mh_ref_name_valid("a\0b", 3), "refused: a NUL byte");
    char long_name[300];
    memset(long_name, 'a', sizeof long_name);
    TAP_OK(mh_ref_name_valid(long_name, 255) && !mh_ref_name_valid(long_name, 256), "255 bytes at most");
    mh_arena_release(&a);
    return tap_done();
}
