/*
 * test_sigv4.c — unit tests of AWS Signature Version 4 (src/store/sigv4.c):
 * the examples AWS publishes for S3 (header-signed GET with Range, PUT,
 * GET with a query, presigned GET), vectors produced by a second
 * implementation (botocore 1.29, see the comments) for what the s3 backend
 * signs itself (presigned PUT with content-length, server-side copy),
 * URI encoding, the signing-key cache, argument checks and the S3 XML
 * error scanner.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/store/sigv4.h"
#include "tap.h"

#define AKID "AKIAIOSFODNN7EXAMPLE"
#define SECRET "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
#define DATE "20130524T000000Z"
#define HOST "examplebucket.s3.amazonaws.com"

static mh_sigv4_cred_t cred(const char *region)
{
    return (mh_sigv4_cred_t){.access_key = AKID, .secret_key = SECRET, .region = region, .service = "s3"};
}

/* The buffer as a NUL-terminated string (the test owns it). */
static const char *str(mh_buf_t *b)
{
    mh_buf_append_byte(b, 0);
    b->len--;
    return (const char *)b->p;
}

static void test_encode(void)
{
    mh_buf_t b = {0};
    mh_sigv4_uri_encode(&b, "a-Z_0.~/ $+=&%é", strlen("a-Z_0.~/ $+=&%é"), true);
    TAP_EQ_STR(str(&b), "a-Z_0.~/%20%24%2B%3D%26%25%C3%A9", "uri encode keeps unreserved and '/' in paths");
    b.len = 0;
    mh_sigv4_uri_encode(&b, "AKID/20130524/us-east-1/s3/aws4_request", 39, false);
    TAP_EQ_STR(str(&b), "AKID%2F20130524%2Fus-east-1%2Fs3%2Faws4_request", "uri encode query encodes '/'");
    b.len = 0;
    mh_sigv4_uri_encode(&b, "", 0, false);
    TAP_EQ_STR(str(&b), "", "uri encode of empty string");
    mh_buf_free(&b);

    char d[17];
    mh_sigv4_amz_date(1369353600, d);
    TAP_EQ_STR(d, DATE, "amz date of 2013-05-24 00:00:00 UTC");
    mh_sigv4_amz_date(1700000000, d);
    TAP_EQ_STR(d, "20231114T221320Z", "amz date of 1700000000");
}

/* AWS: "Example: GET Object" (header-based auth, Range: bytes=0-9). */
static void test_aws_get_object(void)
{
    mh_sigv4_cred_t c = cred("us-east-1");
    mh_sigv4_kv_t h[] = {
        {"Host", HOST},
        {"Range", "bytes=0-9"},
        {"x-amz-content-sha256", MH_SIGV4_EMPTY_SHA256},
        {"x-amz-date", DATE},
    };
    mh_sigv4_req_t r = {.method = "GET", .path = "/test.txt", .headers = h, .nheaders = 4,
                        .payload_hash = MH_SIGV4_EMPTY_SHA256, .amz_date = DATE};
    mh_buf_t b = {0};
    TAP_EQ_INT(mh_sigv4_canonical_request(&r, &b), 0, "GET object: canonical request");
    TAP_EQ_STR(str(&b),
               "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n"
               "x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n"
               "x-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\n"
               "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
               "GET object: canonical request matches AWS");
    b.len = 0;
    mh_sigv4_string_to_sign(&c, &r, &b);
    TAP_EQ_STR(str(&b),
               "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
               "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972",
               "GET object: string to sign matches AWS");
    char sig[65];
    TAP_EQ_INT(mh_sigv4_sign(&c, &r, sig), 0, "GET object: sign");
    TAP_EQ_STR(sig, "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
               "GET object: signature matches AWS");
    b.len = 0;
    mh_sigv4_authorization(&c, &r, &b);
    TAP_EQ_STR(str(&b),
               "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
               "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
               "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
               "GET object: Authorization header");

    /* Order and case of the given headers, and blanks around values, do
     * not matter: they are canonicalised. */
    mh_sigv4_kv_t h2[] = {
        {"X-Amz-Date", "  " DATE},
        {"RANGE", "bytes=0-9  "},
        {"x-amz-content-sha256", MH_SIGV4_EMPTY_SHA256},
        {"host", HOST},
    };
    r.headers = h2;
    mh_sigv4_sign(&c, &r, sig);
    TAP_EQ_STR(sig, "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
               "GET object: header order, case and blanks canonicalised");
    mh_buf_free(&b);
}

/* AWS: "Example: PUT Object" (a '$' in the key, a Date header). */
static void test_aws_put_object(void)
{
    mh_sigv4_cred_t c = cred("us-east-1");
    const char *ph = "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072";
    uint8_t d[32];
    char hex[65];
    mh_sha256("Welcome to Amazon S3.", 21, d);
    mh_hex_encode(hex, d, 32);
    TAP_EQ_STR(hex, ph, "PUT object: payload hash of the example body");
    mh_sigv4_kv_t h[] = {
        {"date", "Fri, 24 May 2013 00:00:00 GMT"},  {"host", HOST},
        {"x-amz-content-sha256", ph},               {"x-amz-date", DATE},
        {"x-amz-storage-class", "REDUCED_REDUNDANCY"},
    };
    mh_sigv4_req_t r = {.method = "PUT", .path = "/test$file.text", .headers = h, .nheaders = 5,
                        .payload_hash = ph, .amz_date = DATE};
    char sig[65];
    mh_sigv4_sign(&c, &r, sig);
    TAP_EQ_STR(sig, "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
               "PUT object: signature matches AWS ('$' encoded in the path)");
}

/* AWS: "Example: GET Bucket (List Objects)" (?max-keys=2&prefix=J) and
 * "Example: GET Bucket Lifecycle" (?lifecycle, an empty value). */
static void test_aws_query(void)
{
    mh_sigv4_cred_t c = cred("us-east-1");
    mh_sigv4_kv_t h[] = {{"host", HOST}, {"x-amz-content-sha256", MH_SIGV4_EMPTY_SHA256}, {"x-amz-date", DATE}};
    mh_sigv4_kv_t q[] = {{"prefix", "J"}, {"max-keys", "2"}}; /* unsorted on purpose */
    mh_sigv4_req_t r = {.method = "GET", .path = "/", .query = q, .nquery = 2, .headers = h, .nheaders = 3,
                        .payload_hash = MH_SIGV4_EMPTY_SHA256, .amz_date = DATE};
    char sig[65];
    mh_sigv4_sign(&c, &r, sig);
    TAP_EQ_STR(sig, "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
               "list objects: sorted canonical query, signature matches AWS");
    mh_sigv4_kv_t q2[] = {{"lifecycle", ""}};
    r.query = q2;
    r.nquery = 1;
    mh_sigv4_sign(&c, &r, sig);
    TAP_EQ_STR(sig, "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
               "bucket lifecycle: empty query value, signature matches AWS");
}

/* AWS: "Example: Presigned URL" (GET /test.txt, 86400 s). */
static void test_aws_presigned(void)
{
    mh_sigv4_cred_t c = cred("us-east-1");
    mh_sigv4_kv_t h[] = {{"host", HOST}};
    mh_sigv4_req_t r = {.method = "GET", .path = "/test.txt", .headers = h, .nheaders = 1,
                        .payload_hash = MH_SIGV4_UNSIGNED_PAYLOAD, .amz_date = DATE};
    mh_buf_t b = {0};
    TAP_EQ_INT(mh_sigv4_presign(&c, &r, 86400, &b), 0, "presigned GET: sign");
    TAP_EQ_STR(str(&b),
               "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2F"
               "aws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
               "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404",
               "presigned GET: query and signature match AWS");
    b.len = 0;
    TAP_EQ_INT(mh_sigv4_presign(&c, &r, 0, &b), MH_EINVAL, "presign: expiry 0 refused");
    TAP_EQ_INT(mh_sigv4_presign(&c, &r, 604801, &b), MH_EINVAL, "presign: expiry past 7 days refused");
    TAP_EQ_INT(mh_sigv4_presign(&c, &r, 604800, &b), 0, "presign: expiry of exactly 7 days accepted");
    mh_buf_free(&b);
}

/* What the s3 backend signs, checked against botocore 1.29 (S3SigV4QueryAuth
 * and S3SigV4Auth with the clock fixed at 2013-05-24T00:00:00Z). */
static void test_botocore_vectors(void)
{
    mh_sigv4_cred_t c = cred("us-east-1");
    /* Presigned PUT, path style, a port in the host, content-length signed. */
    mh_sigv4_kv_t h[] = {{"host", "127.0.0.1:9000"}, {"content-length", "12345"}};
    mh_sigv4_req_t r = {.method = "PUT", .path = "/musehub/incoming/abc_DEF-123", .headers = h, .nheaders = 2,
                        .payload_hash = MH_SIGV4_UNSIGNED_PAYLOAD, .amz_date = DATE};
    mh_buf_t b = {0};
    mh_sigv4_presign(&c, &r, 3600, &b);
    TAP_EQ_STR(str(&b),
               "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2F"
               "aws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=content-length%3Bhost"
               "&X-Amz-Signature=3b329a1f2a14560fc2571e89f91871697a48978568d4bdda151946c6e2af3d79",
               "presigned PUT with content-length: matches botocore");

    /* Server-side copy in another region. */
    mh_sigv4_cred_t c2 = cred("eu-west-3");
    char key[96] = "/musehub/mpacks/";
    for (int i = 0; i < 32; i++) strcat(key, "ab");
    mh_sigv4_kv_t h2[] = {{"host", "127.0.0.1:9000"},
                          {"x-amz-copy-source", "/musehub/incoming/up1"},
                          {"x-amz-content-sha256", MH_SIGV4_EMPTY_SHA256},
                          {"x-amz-date", DATE}};
    mh_sigv4_req_t r2 = {.method = "PUT", .path = key, .headers = h2, .nheaders = 4,
                         .payload_hash = MH_SIGV4_EMPTY_SHA256, .amz_date = DATE};
    b.len = 0;
    mh_sigv4_authorization(&c2, &r2, &b);
    TAP_EQ_STR(str(&b),
               "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/eu-west-3/s3/aws4_request,"
               "SignedHeaders=host;x-amz-content-sha256;x-amz-copy-source;x-amz-date,"
               "Signature=5a4ff1f85aa9d7a033f1f5aff44989296f357f9862864af6603b9b652713b6ef",
               "copy with x-amz-copy-source: matches botocore");
    mh_buf_free(&b);
}

static void test_key_cache_and_args(void)
{
    mh_sigv4_cred_t c = cred("us-east-1");
    uint8_t k[32];
    mh_sigv4_signing_key(SECRET, "20130524", "us-east-1", "s3", k);
    mh_sigv4_kv_t h[] = {{"host", HOST}};
    mh_sigv4_req_t r = {.method = "GET", .path = "/test.txt", .headers = h, .nheaders = 1,
                        .payload_hash = MH_SIGV4_UNSIGNED_PAYLOAD, .amz_date = DATE};
    char sig[65], sig2[65];
    mh_sigv4_sign(&c, &r, sig);
    TAP_OK(memcmp(c.key, k, 32) == 0 && strcmp(c.key_date, "20130524") == 0, "signing key cached for its date");
    r.amz_date = "20130525T000000Z";
    mh_sigv4_sign(&c, &r, sig2);
    TAP_OK(strcmp(c.key_date, "20130525") == 0 && memcmp(c.key, k, 32) != 0, "a new date derives a new key");
    TAP_OK(strcmp(sig, sig2) != 0, "signatures of different dates differ");

    mh_buf_t b = {0};
    mh_sigv4_kv_t nohost[] = {{"x-amz-date", DATE}};
    mh_sigv4_kv_t dup[] = {{"host", HOST}, {"Host", HOST}};
    mh_sigv4_req_t bad = r;
    bad.headers = nohost;
    TAP_EQ_INT(mh_sigv4_canonical_request(&bad, &b), MH_EINVAL, "no host header refused");
    bad.headers = dup;
    bad.nheaders = 2;
    TAP_EQ_INT(mh_sigv4_canonical_request(&bad, &b), MH_EINVAL, "duplicate header refused");
    bad = r;
    bad.path = "test.txt";
    TAP_EQ_INT(mh_sigv4_canonical_request(&bad, &b), MH_EINVAL, "relative path refused");
    bad = r;
    bad.amz_date = "2013";
    TAP_EQ_INT(mh_sigv4_canonical_request(&bad, &b), MH_EINVAL, "short date refused");
    bad = r;
    bad.nheaders = MH_SIGV4_MAX_KV + 1;
    TAP_EQ_INT(mh_sigv4_canonical_request(&bad, &b), MH_EINVAL, "too many headers refused");
    mh_buf_free(&b);
}

static void test_xml(void)
{
    char code[32], msg[64];
    const char *e = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchKey</Code><Message>The "
                    "specified key does not exist.</Message><Key>x</Key></Error>";
    TAP_EQ_INT(mh_s3_xml_error(e, strlen(e), code, sizeof code, msg, sizeof msg), 0, "xml: error parsed");
    TAP_EQ_STR(code, "NoSuchKey", "xml: code");
    TAP_EQ_STR(msg, "The specified key does not exist.", "xml: message");

    const char *slow = "<Error><Message>Reduce your request rate.</Message><Code>SlowDown</Code></Error>";
    mh_s3_xml_error(slow, strlen(slow), code, sizeof code, msg, sizeof msg);
    TAP_OK(strcmp(code, "SlowDown") == 0 && strcmp(msg, "Reduce your request rate.") == 0,
           "xml: message before code");

    const char *ok = "<CopyObjectResult><ETag>\"x\"</ETag></CopyObjectResult>";
    TAP_EQ_INT(mh_s3_xml_error(ok, strlen(ok), code, sizeof code, msg, sizeof msg), MH_EPARSE,
               "xml: a success body is not an error");
    TAP_EQ_STR(code, "", "xml: code empty when not an error");

    const char *trunc = "<Error><Code>InternalErr";
    TAP_EQ_INT(mh_s3_xml_error(trunc, strlen(trunc), code, sizeof code, NULL, 0), MH_EPARSE,
               "xml: unterminated code refused");
    const char *outside = "<Error></Error><Code>X</Code>";
    TAP_EQ_INT(mh_s3_xml_error(outside, strlen(outside), code, sizeof code, NULL, 0), MH_EPARSE,
               "xml: a code after </Error> is not the error's");
    const char *ctl = "<Error><Code>A\nB\x01\xc3\xa9</Code></Error>";
    mh_s3_xml_error(ctl, strlen(ctl), code, sizeof code, NULL, 0);
    TAP_EQ_STR(code, "A?B???", "xml: control and non-ASCII bytes become '?'");
    char tiny[4];
    mh_s3_xml_error(e, strlen(e), tiny, sizeof tiny, NULL, 0);
    TAP_EQ_STR(tiny, "NoS", "xml: truncated to the output size");
    TAP_EQ_INT(mh_s3_xml_error(e, 10, code, sizeof code, msg, sizeof msg), MH_EPARSE, "xml: bounded by n");
    TAP_EQ_INT(mh_s3_xml_error(NULL, 0, code, sizeof code, msg, sizeof msg), MH_EPARSE, "xml: NULL body");
}

/* The result-body helpers of the streams: elements with attributes,
 * entities, nothing truncated, times. */
static void test_xml_results(void)
{
    const char *b = "<?xml version=\"1.0\"?><ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
                    "<Contents><Key>a&amp;b</Key><Size>3</Size></Contents><Contents><Key>c</Key></Contents>"
                    "<Empty/></ListBucketResult>";
    const char *end = b + strlen(b), *in, *p;
    size_t inn;
    TAP_OK(mh_s3_xml_next(b, end, "ListBucketResult", &in, &inn) != NULL, "xml: root with an xmlns attribute");
    p = mh_s3_xml_next(b, end, "Contents", &in, &inn);
    char out[16];
    TAP_OK(p && mh_s3_xml_text(in, inn, "Key", out, sizeof out) == 0 && !strcmp(out, "a&b"), "xml: entity decoded");
    p = mh_s3_xml_next(p, end, "Contents", &in, &inn);
    TAP_OK(p && mh_s3_xml_text(in, inn, "Key", out, sizeof out) == 0 && !strcmp(out, "c"), "xml: second element");
    TAP_OK(mh_s3_xml_next(p, end, "Contents", &in, &inn) == NULL, "xml: no third");
    TAP_OK(mh_s3_xml_next(b, end, "Empty", &in, &inn) == NULL, "xml: <Empty/> has no content");
    TAP_OK(mh_s3_xml_next(b, end, "Content", &in, &inn) == NULL, "xml: a prefix of a tag name is not the tag");
    char tiny[3];
    TAP_EQ_INT(mh_s3_xml_text(b, strlen(b), "Size", tiny, sizeof tiny), 0, "xml: fits exactly");
    TAP_EQ_INT(mh_s3_xml_text("<Id>abc</Id>", 12, "Id", tiny, sizeof tiny), MH_ELIMIT, "xml: never truncated");
    TAP_EQ_INT(mh_s3_xml_text("<Id>a&nbsp;</Id>", 16, "Id", out, sizeof out), MH_EINVAL, "xml: unknown entity");
    TAP_EQ_INT(mh_s3_xml_text("<Id>a\x01</Id>", 11, "Id", out, sizeof out), MH_EINVAL, "xml: control byte");
    TAP_EQ_INT(mh_s3_xml_text("<X>a</X>", 8, "Id", out, sizeof out), MH_EPARSE, "xml: absent");
    int64_t t = 0;
    TAP_OK(mh_s3_iso_time("2026-01-02T03:04:05.000Z", &t) == 0 && t == 1767323045, "time: LastModified");
    TAP_OK(mh_s3_iso_time("1970-01-01T00:00:00Z", &t) == 0 && t == 0, "time: the epoch");
    TAP_OK(mh_s3_iso_time("2024-02-29T23:59:59Z", &t) == 0 && t == 1709251199, "time: a leap day");
    TAP_EQ_INT(mh_s3_iso_time("yesterday", &t), MH_EPARSE, "time: garbage refused");
}

int main(void)
{
    test_encode();
    test_aws_get_object();
    test_aws_put_object();
    test_aws_query();
    test_aws_presigned();
    test_botocore_vectors();
    test_key_cache_and_args();
    test_xml();
    test_xml_results();
    return tap_done();
}
