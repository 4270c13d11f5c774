/*
 * fuzz_entry: the Redis-tier cache-entry decoder (cache_entry_decode).
 *
 * Redis holds whatever was written to it: garbage, an old format, someone
 * else's entry, a record cut short.  The key is taken from the record
 * itself (bytes 14..45 when there are that many) so that the fuzzer gets
 * past the key check.  Each input is decoded twice: as it is (the FNV-1a
 * trailer must then match by chance, so this mostly tests rejection), and
 * "sealed": its last 8 bytes replaced by the right FNV-1a 64 of the rest,
 * so that the structural checks behind the checksum are reached too.
 * Whatever decodes is encoded again and must come out byte for byte the
 * same; the same record under another key must not decode.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define KEY_OFF (4 + 1 + 1 + 8)

static uint64_t
fnv1a64(const uint8_t *p, size_t n)
{
    uint64_t h = 14695981039346656037ull;

    for (size_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 1099511628211ull;
    }
    return h;
}

static void
check_one(const uint8_t *data, size_t size)
{
    uint8_t key[CACHE_KEY_LEN];

    if (size >= KEY_OFF + CACHE_KEY_LEN) {
        memcpy(key, data + KEY_OFF, CACHE_KEY_LEN);
    } else {
        memset(key, 0xab, sizeof(key));
    }
    /* a copy of exactly SIZE bytes, so that ASan sees any over-read */
    char *buf = malloc(size ? size : 1);
    if (!buf) {
        return;
    }
    memcpy(buf, data, size);

    struct cache_entry *e = cache_entry_decode(key, buf, size);
    if (e) {
        if (e->body_len > size || memcmp(e->key, key, CACHE_KEY_LEN) != 0 ||
            e->body[e->body_len] != '\0') {
            fprintf(stderr, "decoded entry is inconsistent\n");
            abort();
        }
        size_t len = 0;
        char *again = cache_entry_encode(e, &len);
        if (!again) {
            fprintf(stderr, "a decoded entry does not encode\n");
            abort();
        }
        if (len != size || memcmp(again, buf, size) != 0) {
            fprintf(stderr, "decode+encode changed the record (%zu -> %zu bytes)\n", size, len);
            abort();
        }
        free(again);
        uint8_t other[CACHE_KEY_LEN];
        memcpy(other, key, sizeof(other));
        other[0] ^= 1;
        if (cache_entry_decode(other, buf, size)) {
            fprintf(stderr, "a record decodes under another key\n");
            abort();
        }
        cache_entry_unref(e);
    }
    free(buf);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_one(data, size);
    if (size >= 8) {
        uint8_t *sealed = malloc(size);
        if (!sealed) {
            return 0;
        }
        memcpy(sealed, data, size);
        uint64_t h = fnv1a64(sealed, size - 8);
        for (int i = 0; i < 8; i++) {
            sealed[size - 8 + i] = (uint8_t)(h >> (56 - 8 * i));
        }
        check_one(sealed, size);
        free(sealed);
    }
    return 0;
}
