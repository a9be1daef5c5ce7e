/*
 * fuzz_xff.c — libFuzzer target for the client address of rate limiting
 * (auth.h: mh_auth_client_addr), which reads X-Forwarded-For, a header
 * any client can send, when the TCP peer is a trusted proxy
 * (MUSEHUB_TRUSTED_PROXIES; docs/deployment.md).
 *
 * Input: byte 0 picks the peer (trusted IPv4, trusted IPv6, untrusted,
 * unknown), the rest is the X-Forwarded-For value, copied into an
 * exact-size heap buffer so ASan catches any read past its end.
 * Invariants checked (abort on violation): the answer is never NULL; an
 * untrusted or unknown peer is the answer whatever the header says; an
 * answer other than the peer is an IP address that occurs in the header
 * and is not one of the trusted proxies (a client can only ever be keyed
 * by an address some proxy wrote, never by a trusted proxy's).
 */
#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mh/auth.h"

#define TRUSTED "10.9.9.9, 127.0.0.1, ::1, 2001:db8::7"

static mh_auth_t *au;

static bool is_ip(const char *s)
{
    uint8_t b[16];
    return inet_pton(AF_INET, s, b) == 1 || inet_pton(AF_INET6, s, b) == 1;
}

/* The trusted list, compared as addresses (an IPv4-mapped IPv6 spelling
 * of a trusted IPv4 address is that address). */
static bool trusted(const char *s)
{
    uint8_t a[16], t[16];
    int af = AF_INET6;
    if (inet_pton(AF_INET, s, a) == 1) af = AF_INET;
    else if (inet_pton(AF_INET6, s, a) != 1) return false;
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (af == AF_INET6 && !memcmp(a, mapped, 12)) {
        memmove(a, a + 12, 4);
        af = AF_INET;
    }
    static const char *const list[] = {"10.9.9.9", "127.0.0.1", "::1", "2001:db8::7"};
    for (size_t i = 0; i < sizeof list / sizeof *list; i++) {
        int taf = strchr(list[i], ':') ? AF_INET6 : AF_INET;
        if (taf == af && inet_pton(taf, list[i], t) == 1 && !memcmp(a, t, af == AF_INET ? 4 : 16)) return true;
    }
    return false;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const peers[] = {"127.0.0.1", "::1", "192.0.2.1", ""};
    if (!au) {
        mh_log_set_level("error");
        mh_auth_config_t cfg = {.trusted_proxies = TRUSTED};
        if (mh_auth_new(NULL, &cfg, &au)) abort();
    }
    if (size < 1) return 0;
    const char *peer = peers[data[0] % 4];
    data++, size--;
    char *v = malloc(size ? size : 1);
    if (!v) return 0;
    memcpy(v, data, size);
    mh_req_t req;
    memset(&req, 0, sizeof req);
    mh_arena_init(&req.arena, 0);
    mh_header_t h = {{"x-forwarded-for", 15}, {v, size}};
    req.headers = &h;
    req.nheaders = 1;
    snprintf(req.peer, sizeof req.peer, "%s", peer);
    const char *got = mh_auth_client_addr(au, &req);
    if (!got) abort();
    bool peer_trusted = peer[0] && trusted(peer);
    if (!peer_trusted && strcmp(got, peer[0] ? peer : "unknown") != 0) abort();
    if (peer_trusted && strcmp(got, peer) != 0) {
        if (!is_ip(got) || trusted(got)) abort();
        size_t gl = strlen(got);
        bool found = false;
        for (size_t i = 0; i + gl <= size && !found; i++) found = !memcmp(v + i, got, gl);
        if (!found) abort();
    }
    mh_arena_release(&req.arena);
    free(v);
    return 0;
}
