/*
 * fuzz_s3xml.c — libFuzzer target for the S3 XML error scanner
 * (mh_s3_xml_error, src/store/sigv4.c), which reads bodies an S3 store
 * (or anything answering at MUSEHUB_S3_ENDPOINT) sends us.
 *
 * Input: the body bytes, copied into an exact-size heap buffer so ASan
 * catches any read past the end. Invariants checked: outputs are always
 * NUL-terminated within their size and hold printable ASCII only; a
 * successful scan implies "<Error>" and "<Code>" occur in the scanned
 * prefix; a failed scan leaves both outputs empty; tiny output buffers
 * (sizes 0 and 1) are safe.
 *
 * The same bytes also go through the result-body helpers the streams use
 * (mh_s3_xml_next over ListObjectsV2 / ListMultipartUploads shapes,
 * mh_s3_xml_text, mh_s3_iso_time): every element found lies inside the
 * input, texts are NUL-terminated printable ASCII within their buffer,
 * and a walk always ends.
 */
#include <stdlib.h>
#include <string.h>

#include "../../src/store/sigv4.h"

static void check_out(const char *s, size_t size)
{
    size_t n = strnlen(s, size);
    if (n >= size) abort(); /* not terminated inside the buffer */
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] >= 0x7f) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *body = malloc(size ? size : 1);
    if (!body) return 0;
    memcpy(body, data, size);
    char code[64], msg[256], tiny[1];
    int rc = mh_s3_xml_error(body, size, code, sizeof code, msg, sizeof msg);
    check_out(code, sizeof code);
    check_out(msg, sizeof msg);
    size_t scanned = size < MH_S3_XML_SCAN_MAX ? size : MH_S3_XML_SCAN_MAX;
    if (rc == 0) {
        if (!memmem(body, scanned, "<Error>", 7) || !memmem(body, scanned, "<Code>", 6)) abort();
    } else if (rc != MH_EPARSE || code[0] || msg[0]) {
        abort();
    }
    int rc2 = mh_s3_xml_error(body, size, tiny, sizeof tiny, NULL, 0);
    if (rc2 != rc || tiny[0]) abort();
    mh_s3_xml_error(body, size, NULL, 0, tiny, 0);

    const char *end = body + size, *p = body, *in;
    size_t inn, steps = 0;
    while ((p = mh_s3_xml_next(p, end, "Contents", &in, &inn)) != NULL) {
        if (in < body || in + inn > end || p > end || ++steps > size) abort();
        char key[64], tm[40];
        if (mh_s3_xml_text(in, inn, "Key", key, sizeof key) == 0) check_out(key, sizeof key);
        int64_t t;
        if (mh_s3_xml_text(in, inn, "LastModified", tm, sizeof tm) == 0) {
            check_out(tm, sizeof tm);
            mh_s3_iso_time(tm, &t);
        }
    }
    char id[8];
    if (mh_s3_xml_text(body, size, "UploadId", id, sizeof id) == 0) check_out(id, sizeof id);
    free(body);
    return 0;
}
