/*
 * fuzz_cache_key: the cache-key canonicaliser.
 *
 * The input is parsed as dsgate parses a request body (json_loadb, no
 * flags); when it is a JSON document the key is computed, then the document
 * is written out again in other shapes (compact and sorted, indented and
 * unsorted, ASCII-escaped) and each is parsed and keyed again: the key must
 * not change, since it depends on the meaning of the body only.  A
 * credential changes the key; the same credential gives the same key.
 *
 * Jansson is not instrumented (Debian's shared library), so the code that
 * libFuzzer sees is tiny; to keep structurally different documents in the
 * corpus the target reports the shape of each document (value types by
 * depth and parent, string and number traits) as libFuzzer extra counters.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cache.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* libFuzzer reads this section as extra coverage counters. */
__attribute__((section("__libfuzzer_extra_counters"))) static uint8_t shape[4096];

static void
bump(unsigned a, unsigned b, unsigned c)
{
    unsigned i = (a * 131u + b * 17u + c) % sizeof(shape);
    if (shape[i] < 255) {
        shape[i]++;
    }
}

static void
walk(const json_t *v, unsigned depth, unsigned parent)
{
    unsigned t = (unsigned)json_typeof(v);
    unsigned d = depth < 40 ? depth : 40;

    bump(t, d, parent);
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *k;
        json_t *x;
        size_t n = json_object_size(v);
        bump(10, n < 16 ? (unsigned)n : 16, 1);
        json_object_foreach((json_t *)v, k, x) {
            size_t kl = strlen(k);
            bump(11, kl < 8 ? (unsigned)kl : 8, (unsigned char)k[0] >> 5);
            walk(x, depth + 1, t);
        }
        break;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        bump(12, n < 16 ? (unsigned)n : 16, 2);
        for (size_t i = 0; i < n; i++) {
            walk(json_array_get(v, i), depth + 1, t);
        }
        break;
    }
    case JSON_STRING: {
        const char *s = json_string_value(v);
        size_t n = json_string_length(v);
        for (size_t i = 0; i < n; i++) {
            unsigned char ch = (unsigned char)s[i];
            bump(13, ch < 0x20 ? 0 : ch < 0x80 ? (ch == '"' || ch == '\\' ? 1 : 2)
                     : ch < 0xe0 ? 3 : ch < 0xf0 ? 4 : 5, 3);
        }
        break;
    }
    case JSON_INTEGER: {
        json_int_t x = json_integer_value(v);
        bump(14, x < 0 ? 0 : x == 0 ? 1 : x < 1000 ? 2 : x < (json_int_t)1 << 40 ? 3 : 4, 4);
        break;
    }
    case JSON_REAL: {
        double x = json_real_value(v);
        bump(15, x < 0 ? 0 : x == 0 ? 1 : x < 1 ? 2 : x < 1e15 ? 3 : 4, 5);
        break;
    }
    default:
        break;
    }
}

static const char *const group = "deepseek";
static const char *const method = "POST";
static const char *const path = "/v1/chat/completions";

static void
rekey(const json_t *doc, size_t flags, const uint8_t want[CACHE_KEY_LEN], const char *how)
{
    char *s = json_dumps(doc, flags | JSON_ENCODE_ANY);
    if (!s) {
        return;                         /* out of memory only */
    }
    json_error_t err;
    json_t *again = json_loads(s, JSON_DECODE_ANY, &err);
    if (!again) {
        fprintf(stderr, "%s: the re-serialised body does not parse: %s\n  %s\n", how,
                err.text, s);
        abort();
    }
    uint8_t k[CACHE_KEY_LEN];
    if (cache_key(group, method, path, again, NULL, k) != 0) {
        fprintf(stderr, "%s: cache_key failed on the re-parsed body\n", how);
        abort();
    }
    if (memcmp(k, want, CACHE_KEY_LEN) != 0) {
        fprintf(stderr, "%s: the key changed after re-serialising\n  %s\n", how, s);
        abort();
    }
    json_decref(again);
    free(s);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t err;
    json_t *doc = json_loadb((const char *)data, size, 0, &err);

    if (!doc) {
        return 0;
    }
    walk(doc, 0, 9);
    uint8_t k1[CACHE_KEY_LEN], k2[CACHE_KEY_LEN], kc[CACHE_KEY_LEN], kc2[CACHE_KEY_LEN];
    if (cache_key(group, method, path, doc, NULL, k1) != 0) {
        json_decref(doc);
        return 0;
    }
    if (cache_key(group, method, path, doc, "", k2) != 0 || memcmp(k1, k2, CACHE_KEY_LEN) != 0) {
        fprintf(stderr, "an empty credential keys differently from none\n");
        abort();
    }
    if (cache_key(group, method, path, doc, "Bearer sk-a", kc) != 0 ||
        cache_key(group, method, path, doc, "Bearer sk-a", kc2) != 0 ||
        memcmp(kc, kc2, CACHE_KEY_LEN) != 0) {
        fprintf(stderr, "the same credential gives two keys\n");
        abort();
    }
    if (memcmp(kc, k1, CACHE_KEY_LEN) == 0) {
        fprintf(stderr, "a credential does not change the key\n");
        abort();
    }
    char hex[2 * CACHE_KEY_LEN + 1];
    cache_key_hex(k1, hex);
    if (strlen(hex) != 2 * CACHE_KEY_LEN || strspn(hex, "0123456789abcdef") != strlen(hex)) {
        fprintf(stderr, "bad hex key %s\n", hex);
        abort();
    }
    rekey(doc, JSON_COMPACT | JSON_SORT_KEYS, k1, "compact, sorted");
    rekey(doc, JSON_INDENT(2), k1, "indented, unsorted");
    rekey(doc, JSON_ENSURE_ASCII | JSON_PRESERVE_ORDER, k1, "ASCII escapes, in order");
    json_decref(doc);
    return 0;
}
