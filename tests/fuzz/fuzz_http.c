/*
 * fuzz_http: dsgate's request parser (head, framing, body) without sockets,
 * through http_parse_check(buf, len, 8192, 65536) from src/http.h.
 *
 * Besides memory safety: the answer is one of the documented outcomes, and
 * framing is prefix-stable: if the whole buffer is a complete valid request
 * (0), then no shorter prefix may be rejected (a request cannot turn valid
 * by adding bytes after an error), checked at a cut chosen from the input.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool
known(int rc)
{
    switch (rc) {
    case 0: case 1: case 400: case 405: case 413: case 417: case 431: case 505:
        return true;
    default:
        return false;
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* exactly SIZE bytes on the heap, so that ASan sees any over-read */
    char *buf = malloc(size ? size : 1);
    if (!buf) {
        return 0;
    }
    memcpy(buf, data, size);
    int rc = http_parse_check(buf, size, 8192, 65536);
    if (!known(rc)) {
        fprintf(stderr, "http_parse_check returned %d\n", rc);
        abort();
    }
    if (rc == 0 && size > 0) {
        size_t cut = (size_t)data[size - 1] * 257u % size;
        int p = http_parse_check(buf, cut, 8192, 65536);
        if (p != 0 && p != 1) {
            fprintf(stderr, "a valid request (%zu bytes) has a prefix of %zu bytes that is "
                            "rejected with %d\n", size, cut, p);
            abort();
        }
    }
    free(buf);
    return 0;
}
