/*
 * store_scan.c — lists the keys under a prefix of the object store, for
 * fsck (admin_internal.h). The store interface (include/mh/store.h) has no
 * listing; this is a synchronous, read-only walk that belongs there once
 * the store gains one.
 *
 *   fs  readdir of <dir>/<prefix> (the fs backend keeps keys as plain
 *       files: <dir>/mpacks/<hex>, <dir>/incoming/<id>), fstatat for size
 *       and mtime.
 *   s3  ListObjectsV2 (GET /<bucket>?list-type=2&prefix=...) page by page
 *       with libcurl's own SigV4 signing (CURLOPT_AWS_SIGV4), path-style or
 *       virtual-hosted as MUSEHUB_S3_PATH_STYLE says. The XML answer is
 *       read for <Key>, <Size>, <LastModified>, <IsTruncated> and
 *       <NextContinuationToken> only.
 */
#include <curl/curl.h>
#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "admin_internal.h"

static bool key_ok(const char *k, size_t n)
{
    if (n == 7 + 64 && !memcmp(k, "mpacks/", 7)) {
        for (size_t i = 7; i < n; i++)
            if (!((k[i] >= '0' && k[i] <= '9') || (k[i] >= 'a' && k[i] <= 'f'))) return false;
        return true;
    }
    if (n > 9 && n <= 9 + 64 && !memcmp(k, "incoming/", 9)) {
        for (size_t i = 9; i < n; i++)
            if (!((k[i] >= '0' && k[i] <= '9') || (k[i] >= 'a' && k[i] <= 'z') || (k[i] >= 'A' && k[i] <= 'Z') ||
                  k[i] == '_' || k[i] == '-'))
                return false;
        return true;
    }
    return false;
}

static int push(mh__store_list_t *l, const char *key, size_t kn, uint64_t size, int64_t mtime)
{
    if (!key_ok(key, kn)) {
        l->skipped++;
        return 0;
    }
    mh__store_obj_t *v = mh_vec_grow(l->v, &l->cap, l->n + 1, sizeof *v, 256);
    if (!v) return -1;
    l->v = v;
    mh__store_obj_t *o = &l->v[l->n++];
    memcpy(o->key, key, kn);
    o->key[kn] = 0;
    o->size = size;
    o->mtime = mtime;
    return 0;
}

static int cmp_key(const void *a, const void *b)
{
    return strcmp(((const mh__store_obj_t *)a)->key, ((const mh__store_obj_t *)b)->key);
}

void mh__store_list_free(mh__store_list_t *l)
{
    free(l->v);
    memset(l, 0, sizeof *l);
}

/* ------------------------------------------------------------------ fs */

static int list_fs(const char *dir, const char *prefix, mh__store_list_t *out)
{
    char path[4096];
    size_t pl = strlen(prefix);
    snprintf(path, sizeof path, "%s/%.*s", dir, (int)(pl - 1), prefix); /* without the '/' */
    DIR *d = opendir(path);
    if (!d) {
        if (errno == ENOENT) return 0; /* nothing stored yet */
        fprintf(stderr, "musehubd fsck: cannot list %s: %s\n", path, strerror(errno));
        return -1;
    }
    struct dirent *e;
    int rc = 0;
    while (!rc && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) {
            out->skipped++;
            continue;
        }
        char key[80];
        int kn = snprintf(key, sizeof key, "%s%s", prefix, e->d_name);
        if (kn < 0 || (size_t)kn >= sizeof key) {
            out->skipped++;
            continue;
        }
        rc = push(out, key, (size_t)kn, (uint64_t)st.st_size, (int64_t)st.st_mtime);
    }
    closedir(d);
    if (rc) fprintf(stderr, "musehubd fsck: out of memory listing %s\n", path);
    return rc;
}

/* ------------------------------------------------------------------ s3 */

static size_t body_cb(char *p, size_t sz, size_t nm, void *ud)
{
    mh_buf_t *b = ud;
    return mh_buf_append(b, p, sz * nm) ? 0 : sz * nm;
}

/* The text of the first <tag>...</tag> in [p, end), entities decoded into
 * out (size cap); NULL when absent. */
static const char *xml_text(const char *p, const char *end, const char *tag, char *out, size_t cap, const char **after)
{
    char open[64], close[64];
    snprintf(open, sizeof open, "<%s>", tag);
    snprintf(close, sizeof close, "</%s>", tag);
    const char *a = memmem(p, (size_t)(end - p), open, strlen(open));
    if (!a) return NULL;
    a += strlen(open);
    const char *b = memmem(a, (size_t)(end - a), close, strlen(close));
    if (!b) return NULL;
    static const struct {
        const char *ent, ch;
    } ents[] = {{"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
    size_t n = 0;
    for (const char *q = a; q < b && n + 1 < cap;) {
        bool done = false;
        for (size_t i = 0; i < sizeof ents / sizeof ents[0] && !done; i++) {
            size_t el = strlen(ents[i].ent);
            if ((size_t)(b - q) >= el && !memcmp(q, ents[i].ent, el)) {
                out[n++] = ents[i].ch;
                q += el;
                done = true;
            }
        }
        if (!done) out[n++] = *q++;
    }
    out[n] = 0;
    if (after) *after = b + strlen(close);
    return out;
}

static int64_t iso_to_unix(const char *s)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    if (!strptime(s, "%Y-%m-%dT%H:%M:%S", &tm)) return 0;
    return (int64_t)timegm(&tm);
}

int mh__s3_list_page(const char *body, size_t n, mh__store_list_t *out, char **next_token)
{
    *next_token = NULL;
    if (!body || !n) return 0; /* an empty page */
    const char *p = body, *end = body + n;
    char text[1024];
    bool truncated = xml_text(p, end, "IsTruncated", text, sizeof text, NULL) && !strcmp(text, "true");
    if (truncated) {
        if (!xml_text(p, end, "NextContinuationToken", text, sizeof text, NULL) || !text[0]) return -1;
        if (!(*next_token = strdup(text))) return -1;
    }
    const char *q = p;
    for (;;) {
        const char *cs = memmem(q, (size_t)(end - q), "<Contents>", 10);
        if (!cs) break;
        const char *ce = memmem(cs, (size_t)(end - cs), "</Contents>", 11);
        if (!ce) break;
        char key[1024], size[32], mod[64];
        if (xml_text(cs, ce, "Key", key, sizeof key, NULL) && xml_text(cs, ce, "Size", size, sizeof size, NULL) &&
            xml_text(cs, ce, "LastModified", mod, sizeof mod, NULL) &&
            push(out, key, strlen(key), strtoull(size, NULL, 10), iso_to_unix(mod))) {
            free(*next_token);
            *next_token = NULL;
            return -1;
        }
        q = ce + 11;
    }
    return 0;
}

static int list_s3(const mh_config_t *cfg, const char *prefix, mh__store_list_t *out)
{
    const char *bucket = cfg->store + 3;
    const char *region = cfg->s3_region ? cfg->s3_region : "us-east-1";
    char origin[512];
    if (cfg->s3_endpoint) {
        size_t n = strlen(cfg->s3_endpoint);
        while (n && cfg->s3_endpoint[n - 1] == '/') n--;
        snprintf(origin, sizeof origin, "%.*s", (int)n, cfg->s3_endpoint);
    } else {
        snprintf(origin, sizeof origin, "https://s3.%s.amazonaws.com", region);
    }
    char base[1024];
    if (cfg->s3_path_style) {
        snprintf(base, sizeof base, "%s/%s", origin, bucket);
    } else {
        const char *host = strstr(origin, "://");
        host = host ? host + 3 : origin;
        snprintf(base, sizeof base, "%.*s%s.%s", (int)(host - origin), origin, bucket, host);
    }
    CURL *c = curl_easy_init();
    if (!c) {
        fprintf(stderr, "musehubd fsck: cannot initialise libcurl\n");
        return -1;
    }
    char sigv4[128], userpwd[1024];
    snprintf(sigv4, sizeof sigv4, "aws:amz:%s:s3", region);
    snprintf(userpwd, sizeof userpwd, "%s:%s", cfg->s3_access_key ? cfg->s3_access_key : "",
             cfg->s3_secret_key ? cfg->s3_secret_key : "");
    struct curl_slist *hdrs = curl_slist_append(NULL, "x-amz-content-sha256: "
                                                      "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    char *token = NULL;
    int rc = 0;
    mh_buf_t body = {0};
    do {
        char *ep = curl_easy_escape(c, prefix, 0);
        char *et = token ? curl_easy_escape(c, token, 0) : NULL;
        char url[4096];
        /* Query parameters already encoded and in the order SigV4
         * canonicalises them (libcurl signs the URL as given); the bucket
         * of a path-style URL without a trailing '/'. */
        snprintf(url, sizeof url, "%s%s?%s%s%slist-type=2&prefix=%s", base, cfg->s3_path_style ? "" : "/",
                 et ? "continuation-token=" : "", et ? et : "", et ? "&" : "", ep ? ep : "");
        curl_free(ep);
        curl_free(et);
        body.len = 0;
        curl_easy_reset(c);
        curl_easy_setopt(c, CURLOPT_URL, url);
        curl_easy_setopt(c, CURLOPT_AWS_SIGV4, sigv4);
        curl_easy_setopt(c, CURLOPT_USERPWD, userpwd);
        /* S3 wants the payload hash header; libcurl 7.88 does not add it
         * (it signs it, as every x-amz- header it is given). */
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, body_cb);
        curl_easy_setopt(c, CURLOPT_WRITEDATA, &body);
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 10L);
        curl_easy_setopt(c, CURLOPT_TIMEOUT, 120L);
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        CURLcode cc = curl_easy_perform(c);
        long status = 0;
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
        if (cc != CURLE_OK || status != 200) {
            char why[128];
            if (cc != CURLE_OK) snprintf(why, sizeof why, "%s", curl_easy_strerror(cc));
            else if (status == 403) snprintf(why, sizeof why, "HTTP 403 (credentials, clock skew, or no s3:ListBucket)");
            else snprintf(why, sizeof why, "HTTP %ld", status);
            fprintf(stderr, "musehubd fsck: listing s3:%s/%s: %s\n", bucket, prefix, why);
            rc = -1;
            break;
        }
        free(token);
        token = NULL;
        if (mh__s3_list_page((const char *)body.p, body.len, out, &token)) {
            fprintf(stderr, "musehubd fsck: listing s3:%s/%s: a page that does not parse (or out of memory)\n",
                    bucket, prefix);
            rc = -1;
        }
    } while (!rc && token);
    free(token);
    mh_buf_free(&body);
    curl_slist_free_all(hdrs);
    curl_easy_cleanup(c);
    return rc;
}

int mh__store_list(const mh_config_t *cfg, const char *prefix, mh__store_list_t *out)
{
    int rc;
    if (!strncmp(cfg->store, "fs:", 3)) rc = list_fs(cfg->store + 3, prefix, out);
    else if (!strncmp(cfg->store, "s3:", 3)) rc = list_s3(cfg, prefix, out);
    else rc = -1;
    if (!rc && out->n) qsort(out->v, out->n, sizeof *out->v, cmp_key);
    return rc;
}
