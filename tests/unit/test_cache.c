/*
 * Unit tests for cache.c: the cache key (canonical body: key order, white
 * space, escapes and number spellings give one key; prompt, method, path,
 * group and credential give others), cache_storable (a table of complete,
 * partial and malformed JSON and SSE answers), the versioned entry record
 * (round trips, and rejection of every kind of corruption: each truncation,
 * magic, version, flags, key, lengths, bit flips) and the memory LRU
 * (eviction by count and by bytes, LRU order on get, TTL, replacement,
 * max_entries 0, reconfiguration, references that outlive eviction).
 * Tables where possible.  Run from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cache.h"
#include "dialect.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* offsets in the encoded record (see cache.c) */
#define OFF_VERSION 4
#define OFF_FLAGS   5
#define OFF_EXPIRES 6
#define OFF_KEY     14
#define OFF_CTLEN   (OFF_KEY + CACHE_KEY_LEN)
#define OFF_CTYPE   (OFF_CTLEN + 2)

static const char JSON_BODY[] =
    "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,"
    "\"message\":{\"role\":\"assistant\",\"content\":\"echo: hi\"},\"finish_reason\":\"stop\"}]}";
static const char SSE_BODY[] =
    "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"ec\"}}]}\n\n"
    "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"ho\"}}]}\n\n"
    "data: [DONE]\n\n";

/* ---- helpers ------------------------------------------------------------ */

static json_t *parse(const char *text)
{
    json_error_t err;
    json_t *j = json_loads(text, 0, &err);

    if (!j) {
        fail_msg("test body does not parse: %s: %s", text, err.text);
    }
    return j;
}

static void key_of(const char *group, const char *method, const char *path, const char *body,
                   const char *cred, uint8_t out[CACHE_KEY_LEN])
{
    json_t *j = parse(body);

    assert_int_equal(cache_key(group, method, path, j, cred, out), 0);
    json_decref(j);
}

static void hex_of(const uint8_t key[CACHE_KEY_LEN], char *out)
{
    cache_key_hex(key, out);
}

static void make_key(uint8_t key[CACHE_KEY_LEN], unsigned n)
{
    memset(key, 0, CACHE_KEY_LEN);
    key[0] = (uint8_t)n;
    key[1] = (uint8_t)(n >> 8);
    key[2] = (uint8_t)(n >> 16);
    key[31] = 0xa5;
}

static struct cache_entry *entry(unsigned n, bool sse, const char *ctype, const char *body,
                                 size_t len, int64_t expires)
{
    uint8_t key[CACHE_KEY_LEN];

    make_key(key, n);
    struct cache_entry *e = cache_entry_new(key, sse, ctype, body, len, expires);
    assert_non_null(e);
    return e;
}

/* A JSON entry whose body is LEN bytes (LEN >= 16). */
static struct cache_entry *sized_entry(unsigned n, size_t len, int64_t expires)
{
    char *b = malloc(len + 1);

    assert_non_null(b);
    memset(b, 'x', len);
    memcpy(b, "{\"p\":\"", 6);
    memcpy(b + len - 2, "\"}", 2);
    b[len] = '\0';
    struct cache_entry *e = entry(n, false, "application/json", b, len, expires);
    free(b);
    return e;
}

/* ---- key ------------------------------------------------------------------ */

static void test_key_hex(void **state)
{
    uint8_t key[CACHE_KEY_LEN];
    char hex[2 * CACHE_KEY_LEN + 1];

    (void)state;
    for (int i = 0; i < CACHE_KEY_LEN; i++) {
        key[i] = (uint8_t)(i * 8 + 7);
    }
    key[0] = 0x00;
    key[1] = 0xff;
    hex_of(key, hex);
    assert_int_equal(strlen(hex), 64);
    assert_memory_equal(hex, "00ff17", 6);
    for (int i = 0; i < 64; i++) {
        assert_true((hex[i] >= '0' && hex[i] <= '9') || (hex[i] >= 'a' && hex[i] <= 'f'));
    }
    char want[3];
    for (int i = 2; i < CACHE_KEY_LEN; i++) {
        snprintf(want, sizeof(want), "%02x", key[i]);
        assert_memory_equal(hex + 2 * i, want, 2);
    }
}

/* Each row: bodies that must give the same key as the row's first one. */
static const char *const same_key[][6] = {
    {
        "{\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
        "{\"messages\":[{\"content\":\"hi\",\"role\":\"user\"}],\"model\":\"deepseek-chat\"}",
        "{ \"model\" : \"deepseek-chat\" ,\n\t\"messages\" : [ { \"role\" : \"user\" , "
        "\"content\" : \"hi\" } ] }",
        "\r\n  {\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
        "\n\n",
        "{\"model\":\"deepseek\\u002dchat\",\"messages\":[{\"role\":\"\\u0075ser\","
        "\"content\":\"h\\u0069\"}]}",
        NULL,
    },
    {
        "{\"a\":\"caf\xc3\xa9 a/b\",\"t\":0.5}",
        "{\"t\":0.5,\"a\":\"caf\\u00e9 a\\/b\"}",
        "{\"t\":5e-1,\"a\":\"caf\\u00E9 a/b\"}",
        "{\"t\":0.50,\"a\":\"caf\xc3\xa9 a/b\"}",
        "{\"t\":5.0E-1,\"a\":\"caf\xc3\xa9 a\\/b\"}",
        NULL,
    },
    {
        "{\"z\":{\"b\":[1,2,{\"y\":true,\"x\":null}],\"a\":{}},\"a\":[]}",
        "{\"a\":[],\"z\":{\"a\":{},\"b\":[1,2,{\"x\":null,\"y\":true}]}}",
        "{\"a\" : [ ] , \"z\" : { \"a\" : { } , \"b\" : [ 1 , 2 , { \"x\" : null , \"y\" : true }"
        " ] } }",
        NULL,
    },
};

static void test_key_canonical(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(same_key); i++) {
        uint8_t k0[CACHE_KEY_LEN], k[CACHE_KEY_LEN];
        key_of("fake,", "POST", "/v1/chat/completions", same_key[i][0], "Bearer sk-1", k0);
        for (size_t j = 1; j < NELEM(same_key[i]) && same_key[i][j]; j++) {
            key_of("fake,", "POST", "/v1/chat/completions", same_key[i][j], "Bearer sk-1", k);
            if (memcmp(k, k0, CACHE_KEY_LEN) != 0) {
                fail_msg("row %zu: %s and %s give different keys", i, same_key[i][0],
                         same_key[i][j]);
            }
        }
    }
}

static void test_key_deterministic(void **state)
{
    uint8_t a[CACHE_KEY_LEN], b[CACHE_KEY_LEN], zero[CACHE_KEY_LEN] = { 0 };

    (void)state;
    key_of("g,", "POST", "/p", "{\"x\":1}", NULL, a);
    key_of("g,", "POST", "/p", "{\"x\":1}", NULL, b);
    assert_memory_equal(a, b, CACHE_KEY_LEN);
    assert_memory_not_equal(a, zero, CACHE_KEY_LEN);
}

/* Every row differs from the others in one part of the key. */
static const struct key_case {
    const char *name, *group, *method, *path, *body, *cred;
} key_cases[] = {
    { "base", "fake,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"hi\"}",
      "Bearer sk-1" },
    { "prompt", "fake,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"ho\"}",
      "Bearer sk-1" },
    { "prompt space", "fake,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"hi \"}",
      "Bearer sk-1" },
    { "prompt case", "fake,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"Hi\"}",
      "Bearer sk-1" },
    { "model", "fake,", "POST", "/v1/chat/completions", "{\"m\":\"b\",\"q\":\"hi\"}",
      "Bearer sk-1" },
    { "extra member", "fake,", "POST", "/v1/chat/completions",
      "{\"m\":\"a\",\"q\":\"hi\",\"stream\":true}", "Bearer sk-1" },
    { "null member", "fake,", "POST", "/v1/chat/completions",
      "{\"m\":\"a\",\"q\":\"hi\",\"x\":null}", "Bearer sk-1" },
    { "int vs string", "fake,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":1}",
      "Bearer sk-1" },
    { "string one", "fake,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"1\"}",
      "Bearer sk-1" },
    { "method", "fake,", "PUT", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"hi\"}",
      "Bearer sk-1" },
    { "path", "fake,", "POST", "/chat/completions", "{\"m\":\"a\",\"q\":\"hi\"}", "Bearer sk-1" },
    { "path embeddings", "fake,", "POST", "/v1/embeddings", "{\"m\":\"a\",\"q\":\"hi\"}",
      "Bearer sk-1" },
    { "group", "other,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"hi\"}",
      "Bearer sk-1" },
    { "group of two", "fake,other,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"hi\"}",
      "Bearer sk-1" },
    { "credential", "fake,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"hi\"}",
      "Bearer sk-2" },
    { "credential case", "fake,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"hi\"}",
      "bearer sk-1" },
    { "no credential", "fake,", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"hi\"}",
      NULL },
    /* fields cannot run into each other */
    { "boundary group/method", "fake,P", "OST", "/v1/chat/completions",
      "{\"m\":\"a\",\"q\":\"hi\"}", "Bearer sk-1" },
    { "boundary method/path", "fake,", "POST/v1", "/chat/completions",
      "{\"m\":\"a\",\"q\":\"hi\"}", "Bearer sk-1" },
    { "empty group", "", "POST", "/v1/chat/completions", "{\"m\":\"a\",\"q\":\"hi\"}",
      "Bearer sk-1" },
    { "empty body", "fake,", "POST", "/v1/chat/completions", "{}", "Bearer sk-1" },
};

static void test_key_differs(void **state)
{
    uint8_t keys[NELEM(key_cases)][CACHE_KEY_LEN];

    (void)state;
    for (size_t i = 0; i < NELEM(key_cases); i++) {
        const struct key_case *c = &key_cases[i];
        key_of(c->group, c->method, c->path, c->body, c->cred, keys[i]);
        for (size_t j = 0; j < i; j++) {
            if (memcmp(keys[i], keys[j], CACHE_KEY_LEN) == 0) {
                fail_msg("'%s' and '%s' give the same key", key_cases[i].name,
                         key_cases[j].name);
            }
        }
    }
}

static void test_key_credential(void **state)
{
    static const char body[] = "{\"q\":\"hi\"}";
    uint8_t none[CACHE_KEY_LEN], empty[CACHE_KEY_LEN], a[CACHE_KEY_LEN], a2[CACHE_KEY_LEN],
        b[CACHE_KEY_LEN];

    (void)state;
    key_of("g,", "POST", "/p", body, NULL, none);
    key_of("g,", "POST", "/p", body, "", empty);
    key_of("g,", "POST", "/p", body, "Bearer a", a);
    key_of("g,", "POST", "/p", body, "Bearer a", a2);
    key_of("g,", "POST", "/p", body, "Bearer b", b);
    /* NULL and "" both mean: no credential (and cache.shared) */
    assert_memory_equal(none, empty, CACHE_KEY_LEN);
    assert_memory_equal(a, a2, CACHE_KEY_LEN);
    assert_memory_not_equal(a, none, CACHE_KEY_LEN);
    assert_memory_not_equal(a, b, CACHE_KEY_LEN);
    assert_memory_not_equal(b, none, CACHE_KEY_LEN);
    /* a long credential, and ones that differ only at the end */
    char long1[4096], long2[4096];
    memset(long1, 'k', sizeof(long1) - 1);
    long1[sizeof(long1) - 1] = '\0';
    memcpy(long2, long1, sizeof(long1));
    long2[sizeof(long2) - 2] = 'j';
    key_of("g,", "POST", "/p", body, long1, a);
    key_of("g,", "POST", "/p", body, long2, b);
    assert_memory_not_equal(a, b, CACHE_KEY_LEN);
}

/* ---- cache_storable ------------------------------------------------------ */

static const struct storable_case {
    const char *name;
    bool sse;
    const char *body;
    bool ok;
    size_t start;               /* when ok */
} storable_cases[] = {
    /* non-stream */
    { "json", false, "{\"id\":\"x\"}", true, 0 },
    { "json trailing newline", false, "{\"id\":\"x\"}\n", true, 0 },
    { "json leading newlines", false, "\n\n\n{\"id\":\"x\"}", true, 3 },
    { "json leading mixed ws", false, " \t\r\n {\"id\":\"x\"}", true, 5 },
    { "json nested error member", false, "{\"id\":\"x\",\"m\":{\"error\":1}}", true, 0 },
    { "json empty object", false, "{}", true, 0 },
    { "empty", false, "", false, 0 },
    { "only ws", false, " \n\n\t", false, 0 },
    { "truncated", false, "{\"id\":\"x\",\"choices\":[", false, 0 },
    { "cut in a string", false, "{\"id\":\"x", false, 0 },
    { "not json", false, "Service Unavailable", false, 0 },
    { "html", false, "<html>busy</html>", false, 0 },
    { "array", false, "[{\"id\":\"x\"}]", false, 0 },
    { "string", false, "\"x\"", false, 0 },
    { "number", false, "42", false, 0 },
    { "error object", false, "{\"error\":{\"message\":\"busy\",\"type\":\"x\"}}", false, 0 },
    { "error after ws", false, "\n\n{\"error\":{\"message\":\"busy\"}}", false, 0 },
    { "error member beside others", false, "{\"id\":\"x\",\"error\":{\"message\":\"m\"}}", false,
      0 },
    { "error null", false, "{\"id\":\"x\",\"error\":null}", false, 0 },
    { "trailing garbage", false, "{\"id\":\"x\"} junk", false, 0 },
    { "two objects", false, "{\"a\":1}{\"b\":2}", false, 0 },
    { "sse body as json", false, "data: {\"a\":1}\n\ndata: [DONE]\n\n", false, 0 },
    /* stream */
    { "sse", true, "data: {\"a\":1}\n\ndata: [DONE]\n\n", true, 0 },
    { "sse done one newline", true, "data: {\"a\":1}\n\ndata: [DONE]\n", true, 0 },
    { "sse done no newline", true, "data: {\"a\":1}\n\ndata: [DONE]", true, 0 },
    { "sse crlf", true, "data: {\"a\":1}\r\n\r\ndata: [DONE]\r\n\r\n", true, 0 },
    { "sse keep-alive first", true, ": keep-alive\n\ndata: {\"a\":1}\n\ndata: [DONE]\n\n", true,
      14 },
    { "sse many keep-alives", true,
      ": keep-alive\n\n: keep-alive\n\n\n: ping\ndata: {\"a\":1}\n\ndata: [DONE]\n\n", true, 36 },
    { "sse blank lines first", true, "\n\n\r\ndata: {\"a\":1}\n\ndata: [DONE]\n\n", true, 4 },
    { "sse keep-alive in the middle", true,
      "data: {\"a\":1}\n\n: keep-alive\n\ndata: [DONE]\n\n", true, 0 },
    { "sse event field", true, "event: message\ndata: {\"a\":1}\n\ndata: [DONE]\n\n", true, 0 },
    { "sse partial", true, "data: {\"a\":1}\n\ndata: {\"a\":2}\n\n", false, 0 },
    { "sse cut mid event", true, "data: {\"a\":1}\n\ndata: {\"a\":", false, 0 },
    { "sse cut in done", true, "data: {\"a\":1}\n\ndata: [DON", false, 0 },
    { "sse done mid stream", true, "data: [DONE]\n\ndata: {\"a\":1}\n\n", false, 0 },
    { "sse done not at line start", true, "data: {\"a\":1}\n\nxdata: [DONE]\n\n", false, 0 },
    { "sse done glued to event", true, "data: {\"a\":1}data: [DONE]\n\n", false, 0 },
    { "sse done with suffix", true, "data: {\"a\":1}\n\ndata: [DONE]x\n\n", false, 0 },
    { "sse done lower case", true, "data: {\"a\":1}\n\ndata: [done]\n\n", false, 0 },
    { "sse empty", true, "", false, 0 },
    { "sse only keep-alives", true, ": keep-alive\n\n: keep-alive\n\n", false, 0 },
    { "sse unterminated comment", true, ": keep-alive", false, 0 },
    { "sse error event", true, "data: {\"error\":{\"message\":\"broke\"}}\n\n", false, 0 },
    { "json body as sse", true, "{\"id\":\"x\"}", false, 0 },
};

static void test_storable_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(storable_cases); i++) {
        const struct storable_case *c = &storable_cases[i];
        size_t len = strlen(c->body);
        /* an exact-size copy, so that ASan sees any read past the end */
        char *b = malloc(len ? len : 1);
        assert_non_null(b);
        memcpy(b, c->body, len);
        size_t start = 12345;
        bool ok = cache_storable(&dialect_openai, c->sse, b, len, &start);
        if (ok != c->ok) {
            fail_msg("'%s': storable %d, want %d", c->name, ok, c->ok);
        }
        if (ok && start != c->start) {
            fail_msg("'%s': start %zu, want %zu", c->name, start, c->start);
        }
        free(b);
    }
}

/* Every proper prefix of a complete stream is a partial stream. */
static void test_storable_stream_prefixes(void **state)
{
    size_t len = strlen(SSE_BODY);
    size_t start;

    (void)state;
    assert_true(cache_storable(&dialect_openai, true, SSE_BODY, len, &start));
    const char *done = strstr(SSE_BODY, "data: [DONE]");
    size_t complete = (size_t)(done - SSE_BODY) + strlen("data: [DONE]");
    for (size_t n = 0; n < len; n++) {
        char *b = malloc(n ? n : 1);
        assert_non_null(b);
        memcpy(b, SSE_BODY, n);
        bool ok = cache_storable(&dialect_openai, true, b, n, &start);
        if (ok != (n >= complete)) {
            fail_msg("prefix of %zu bytes: storable %d", n, ok);
        }
        free(b);
    }
    len = strlen(JSON_BODY);
    for (size_t n = 0; n < len; n++) {
        char *b = malloc(n ? n : 1);
        assert_non_null(b);
        memcpy(b, JSON_BODY, n);
        if (cache_storable(&dialect_openai, false, b, n, &start)) {
            fail_msg("JSON prefix of %zu bytes is storable", n);
        }
        free(b);
    }
}

/* ---- entry record --------------------------------------------------------- */

static void assert_same_entry(const struct cache_entry *a, const struct cache_entry *b)
{
    assert_memory_equal(a->key, b->key, CACHE_KEY_LEN);
    assert_int_equal(a->sse, b->sse);
    assert_string_equal(a->ctype, b->ctype);
    assert_int_equal(a->body_len, b->body_len);
    assert_memory_equal(a->body, b->body, a->body_len);
    assert_int_equal(b->body[b->body_len], '\0');
    assert_true(a->expires_ms == b->expires_ms);
}

static char *copy(const char *buf, size_t len)
{
    char *c = malloc(len ? len : 1);

    assert_non_null(c);
    memcpy(c, buf, len);
    return c;
}

/* decode on an exact-size heap copy (ASan sees over-reads) */
static struct cache_entry *decode(const uint8_t key[CACHE_KEY_LEN], const char *buf, size_t len)
{
    char *c = copy(buf, len);
    struct cache_entry *e = cache_entry_decode(key, c, len);

    free(c);
    return e;
}

static void test_entry_new_copies(void **state)
{
    char body[] = "{\"a\":1}";
    char ctype[] = "application/json";

    (void)state;
    struct cache_entry *e = entry(1, false, ctype, body, strlen(body), 77);
    body[2] = 'X';
    ctype[0] = 'X';
    assert_string_equal(e->body, "{\"a\":1}");
    assert_string_equal(e->ctype, "application/json");
    assert_int_equal(e->refs, 1);
    assert_false(e->in_memory);
    cache_entry_ref(e);
    assert_int_equal(e->refs, 2);
    cache_entry_unref(e);
    cache_entry_unref(e);
    cache_entry_unref(NULL);
    /* a NULL content type becomes "" */
    e = entry(2, false, NULL, body, 0, 1);
    assert_string_equal(e->ctype, "");
    assert_int_equal(e->body_len, 0);
    cache_entry_unref(e);
}

static void test_entry_round_trip(void **state)
{
    /* an SSE body with every byte value inside its data line */
    char bin[64 + 256 + 32];
    size_t bl = 0;
    memcpy(bin, "data: ", 6);
    bl = 6;
    for (int i = 0; i < 256; i++) {
        bin[bl++] = (char)i;
    }
    memcpy(bin + bl, "\n\ndata: [DONE]\n\n", 16);
    bl += 16;
    /* a large stream */
    size_t big_len = 1024 * 1024 + 20;
    char *big = malloc(big_len);
    assert_non_null(big);
    memset(big, 'z', big_len);
    memcpy(big, "data: ", 6);
    memcpy(big + big_len - 16, "\n\ndata: [DONE]\n\n", 16);
    char ct255[256];
    memset(ct255, 't', 255);
    ct255[255] = '\0';

    const struct {
        bool sse;
        const char *ctype, *body;
        size_t len;
        int64_t expires;
    } cases[] = {
        { false, "application/json", JSON_BODY, strlen(JSON_BODY), 1700000000000LL },
        { false, "application/json; charset=utf-8", "{}", 2, 1 },
        { false, "", "{\"a\":[1,2,3]}", 13, 0 },
        { false, ct255, "{}", 2, INT64_MAX },
        { true, "text/event-stream", SSE_BODY, strlen(SSE_BODY), 253402300799000LL },
        { true, "text/event-stream; charset=utf-8", bin, bl, 42 },
        { true, "text/event-stream", big, big_len, 5 },
    };
    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        struct cache_entry *e =
            entry((unsigned)i + 100, cases[i].sse, cases[i].ctype, cases[i].body, cases[i].len,
                  cases[i].expires);
        size_t len = 0;
        char *buf = cache_entry_encode(e, &len);
        assert_non_null(buf);
        assert_true(len > cases[i].len);
        assert_memory_equal(buf, "DSGC", 4);
        assert_int_equal(buf[OFF_VERSION], CACHE_FORMAT_VERSION);
        struct cache_entry *d = decode(e->key, buf, len);
        if (!d) {
            fail_msg("case %zu does not decode", i);
        }
        assert_same_entry(e, d);
        assert_int_equal(d->refs, 1);
        assert_false(d->in_memory);
        /* the encoding is deterministic */
        size_t len2 = 0;
        char *buf2 = cache_entry_encode(d, &len2);
        assert_int_equal(len, len2);
        assert_memory_equal(buf, buf2, len);
        free(buf2);
        free(buf);
        cache_entry_unref(d);
        cache_entry_unref(e);
    }
    free(big);
}

/* Every truncation, and every extension, of valid records is rejected. */
static void test_entry_truncated(void **state)
{
    const struct {
        bool sse;
        const char *ctype, *body;
    } cases[] = {
        { false, "application/json", JSON_BODY },
        { true, "text/event-stream", SSE_BODY },
        { false, "", "{}" },
    };
    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        struct cache_entry *e = entry(7, cases[i].sse, cases[i].ctype, cases[i].body,
                                      strlen(cases[i].body), 99);
        size_t len;
        char *buf = cache_entry_encode(e, &len);
        assert_non_null(buf);
        for (size_t n = 0; n < len; n++) {
            struct cache_entry *d = decode(e->key, buf, n);
            if (d) {
                fail_msg("case %zu: a record cut to %zu of %zu bytes decodes", i, n, len);
            }
        }
        char *longer = malloc(len + 3);
        assert_non_null(longer);
        memcpy(longer, buf, len);
        memcpy(longer + len, "\n\n\n", 3);
        for (size_t x = 1; x <= 3; x++) {
            assert_null(decode(e->key, longer, len + x));
        }
        free(longer);
        free(buf);
        cache_entry_unref(e);
    }
}

/* One changed field at a time: magic, version, flags, key, lengths, ctype. */
static void test_entry_corrupt_fields(void **state)
{
    struct cache_entry *e = entry(9, false, "application/json", JSON_BODY, strlen(JSON_BODY), 99);
    size_t len, cl = strlen("application/json");
    char *good = cache_entry_encode(e, &len);
    size_t off_blen = OFF_CTYPE + cl;

    (void)state;
    assert_non_null(good);
    struct cache_entry *ok = decode(e->key, good, len);
    assert_non_null(ok);
    cache_entry_unref(ok);

    char *b = malloc(len);
    assert_non_null(b);
#define RESET() memcpy(b, good, len)
#define REJECT(why)                                                        \
    do {                                                                   \
        struct cache_entry *d_ = decode(e->key, b, len);                   \
        if (d_) {                                                          \
            cache_entry_unref(d_);                                         \
            fail_msg("accepted: %s", why);                                 \
        }                                                                  \
    } while (0)

    /* magic */
    for (int i = 0; i < 4; i++) {
        RESET();
        b[i] ^= 0x20;
        REJECT("magic");
    }
    RESET();
    memcpy(b, "DSGD", 4);
    REJECT("magic DSGD");
    /* versions other than the current one (older and future) */
    const int versions[] = { 0, CACHE_FORMAT_VERSION + 1, 3, 0x7f, 0x80, 0xff };
    for (size_t i = 0; i < NELEM(versions); i++) {
        RESET();
        b[OFF_VERSION] = (char)versions[i];
        REJECT("version");
    }
    /* unknown flags; the SSE flag on a JSON body */
    const int flags[] = { 1, 2, 3, 4, 0x80, 0xfe, 0xff };
    for (size_t i = 0; i < NELEM(flags); i++) {
        RESET();
        b[OFF_FLAGS] = (char)flags[i];
        REJECT("flags");
    }
    /* the embedded key, and asking with another key */
    for (int i = 0; i < CACHE_KEY_LEN; i++) {
        RESET();
        b[OFF_KEY + i] ^= 1;
        REJECT("embedded key");
        uint8_t other[CACHE_KEY_LEN];
        memcpy(other, e->key, CACHE_KEY_LEN);
        other[i] ^= 0x80;
        struct cache_entry *d = decode(other, good, len);
        if (d) {
            cache_entry_unref(d);
            fail_msg("decodes for another key (byte %d)", i);
        }
    }
    /* content type length */
    const unsigned ctlens[] = { 0, 1, (unsigned)cl - 1, (unsigned)cl + 1, (unsigned)cl + 4,
                                255, 256, 0x7fff, 0xffff };
    for (size_t i = 0; i < NELEM(ctlens); i++) {
        RESET();
        b[OFF_CTLEN] = (char)(ctlens[i] >> 8);
        b[OFF_CTLEN + 1] = (char)ctlens[i];
        REJECT("content type length");
    }
    /* content type with a NUL, CR or LF in it */
    const char bad_ct[] = { '\0', '\r', '\n' };
    for (size_t i = 0; i < NELEM(bad_ct); i++) {
        RESET();
        b[OFF_CTYPE + 5] = bad_ct[i];
        REJECT("content type byte");
    }
    /* body length */
    size_t blen = strlen(JSON_BODY);
    const uint32_t blens[] = { 0, 1, (uint32_t)blen - 1, (uint32_t)blen + 1, (uint32_t)blen * 2,
                               0x7fffffffu, 0x80000000u, 0xffffffffu };
    for (size_t i = 0; i < NELEM(blens); i++) {
        RESET();
        for (int k = 0; k < 4; k++) {
            b[off_blen + (size_t)k] = (char)(blens[i] >> (24 - 8 * k));
        }
        REJECT("body length");
    }
    /* the body itself: broken JSON, an error object, leading white space */
    RESET();
    b[off_blen + 4] = 'x';
    REJECT("body not JSON");
    RESET();
    b[len - 1] = ' ';
    REJECT("body cut");
    free(b);
#undef RESET
#undef REJECT

    /* decode checks the shape of a stored answer; its full validation happened
     * when it was stored, and the checksum vouches for the bytes since */
    const char *bad_bodies[] = {
        "\n{\"id\":\"x\"}",
        "not json",
        "",
    };
    for (size_t i = 0; i < NELEM(bad_bodies); i++) {
        struct cache_entry *x = entry(10, false, "application/json", bad_bodies[i],
                                      strlen(bad_bodies[i]), 5);
        size_t xl;
        char *xb = cache_entry_encode(x, &xl);
        assert_non_null(xb);
        struct cache_entry *d = decode(x->key, xb, xl);
        if (d) {
            cache_entry_unref(d);
            fail_msg("an entry with body '%s' decodes", bad_bodies[i]);
        }
        free(xb);
        cache_entry_unref(x);
    }
    const char *bad_streams[] = {
        "data: {\"a\":1}\n\n",
        ": keep-alive\n\ndata: {\"a\":1}\n\ndata: [DONE]\n\n",
        "",
    };
    for (size_t i = 0; i < NELEM(bad_streams); i++) {
        struct cache_entry *x = entry(11, true, "text/event-stream", bad_streams[i],
                                      strlen(bad_streams[i]), 5);
        size_t xl;
        char *xb = cache_entry_encode(x, &xl);
        assert_non_null(xb);
        struct cache_entry *d = decode(x->key, xb, xl);
        if (d) {
            cache_entry_unref(d);
            fail_msg("a stream entry with body '%s' decodes", bad_streams[i]);
        }
        free(xb);
        cache_entry_unref(x);
    }
    /* an SSE entry with the SSE flag cleared */
    struct cache_entry *s = entry(12, true, "text/event-stream", SSE_BODY, strlen(SSE_BODY), 5);
    size_t sl;
    char *sb = cache_entry_encode(s, &sl);
    assert_non_null(sb);
    sb[OFF_FLAGS] = 0;
    assert_null(decode(s->key, sb, sl));
    free(sb);
    cache_entry_unref(s);

    free(good);
    cache_entry_unref(e);
}

/* Every single-bit flip anywhere in the record is rejected (the checksum
 * covers header, content type and body alike). */
static void test_entry_bit_flips(void **state)
{
    struct cache_entry *e = entry(13, true, "text/event-stream", SSE_BODY, strlen(SSE_BODY), 99);
    size_t len;
    char *good = cache_entry_encode(e, &len);

    (void)state;
    assert_non_null(good);
    char *b = malloc(len);
    assert_non_null(b);
    for (size_t pos = 0; pos < len; pos++) {
        for (int bit = 0; bit < 8; bit++) {
            memcpy(b, good, len);
            b[pos] ^= (char)(1 << bit);
            struct cache_entry *d = decode(e->key, b, len);
            if (d) {
                cache_entry_unref(d);
                fail_msg("bit %d of byte %zu flipped: still decodes", bit, pos);
            }
        }
    }
    /* and the untouched record still does, expiry carried as it is */
    struct cache_entry *d = decode(e->key, good, len);
    assert_non_null(d);
    assert_true(d->expires_ms == 99);
    cache_entry_unref(d);
    free(b);
    free(good);
    cache_entry_unref(e);
}

/* ---- memory tier ------------------------------------------------------------ */

static bool has(struct cache_mem *m, unsigned n, int64_t now)
{
    uint8_t key[CACHE_KEY_LEN];

    make_key(key, n);
    struct cache_entry *e = cache_mem_get(m, key, now);
    if (e) {
        cache_entry_unref(e);
    }
    return e != NULL;
}

static void put(struct cache_mem *m, unsigned n, int64_t expires)
{
    struct cache_entry *e = entry(n, false, "application/json", "{\"n\":1}", 7, expires);

    cache_mem_put(m, e);
    cache_entry_unref(e);
}

static void test_mem_put_get(void **state)
{
    struct cache_mem *m = cache_mem_new(10, 1 << 20);

    (void)state;
    assert_non_null(m);
    assert_int_equal(cache_mem_count(m), 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    struct cache_entry *e = entry(1, true, "text/event-stream", SSE_BODY, strlen(SSE_BODY), 1000);
    cache_mem_put(m, e);
    assert_int_equal(e->refs, 2);
    assert_true(e->in_memory);
    assert_int_equal(cache_mem_count(m), 1);
    assert_true(cache_mem_bytes(m) >= strlen(SSE_BODY));
    struct cache_entry *g = cache_mem_get(m, e->key, 0);
    assert_ptr_equal(g, e);
    assert_int_equal(e->refs, 3);
    cache_entry_unref(g);
    /* another key misses */
    uint8_t other[CACHE_KEY_LEN];
    memcpy(other, e->key, CACHE_KEY_LEN);
    other[CACHE_KEY_LEN - 1] ^= 1;
    assert_null(cache_mem_get(m, other, 0));
    /* the same entry again changes nothing */
    cache_mem_put(m, e);
    assert_int_equal(cache_mem_count(m), 1);
    assert_int_equal(e->refs, 2);
    cache_entry_unref(e);
    cache_mem_free(m);
    cache_mem_free(NULL);
}

static void test_mem_evict_by_count(void **state)
{
    struct cache_mem *m = cache_mem_new(3, 1 << 20);

    (void)state;
    put(m, 1, 1000);
    put(m, 2, 1000);
    put(m, 3, 1000);
    assert_int_equal(cache_mem_count(m), 3);
    put(m, 4, 1000);                    /* evicts 1, the oldest */
    assert_int_equal(cache_mem_count(m), 3);
    assert_false(has(m, 1, 0));
    /* get makes an entry the most recent: 2 survives, 3 goes */
    assert_true(has(m, 2, 0));          /* order: 2 4 3 */
    put(m, 5, 1000);                    /* evicts 3 */
    assert_false(has(m, 3, 0));
    assert_true(has(m, 2, 0));
    assert_true(has(m, 4, 0));
    assert_true(has(m, 5, 0));          /* order: 5 4 2 */
    put(m, 6, 1000);                    /* evicts 2 */
    assert_false(has(m, 2, 0));
    assert_true(has(m, 4, 0) && has(m, 5, 0) && has(m, 6, 0));
    cache_mem_free(m);

    /* many: the last 100 of 1000 remain */
    m = cache_mem_new(100, (size_t)1 << 30);
    for (unsigned i = 0; i < 1000; i++) {
        put(m, i, 1000);
    }
    assert_int_equal(cache_mem_count(m), 100);
    for (unsigned i = 0; i < 1000; i++) {
        if (has(m, i, 0) != (i >= 900)) {
            fail_msg("entry %u: present %d", i, !(i >= 900));
        }
    }
    cache_mem_free(m);
}

static void test_mem_evict_by_bytes(void **state)
{
    struct cache_mem *probe = cache_mem_new(10, 1 << 20);

    (void)state;
    struct cache_entry *e = sized_entry(0, 1000, 1000);
    cache_mem_put(probe, e);
    size_t sz = cache_mem_bytes(probe);
    assert_true(sz >= 1000);
    cache_entry_unref(e);
    cache_mem_free(probe);

    /* room for three entries of SZ bytes */
    struct cache_mem *m = cache_mem_new(1000, 3 * sz + sz / 2);
    for (unsigned i = 1; i <= 3; i++) {
        e = sized_entry(i, 1000, 1000);
        cache_mem_put(m, e);
        cache_entry_unref(e);
    }
    assert_int_equal(cache_mem_count(m), 3);
    assert_int_equal(cache_mem_bytes(m), 3 * sz);
    assert_true(has(m, 1, 0));          /* order: 1 3 2 */
    e = sized_entry(4, 1000, 1000);
    cache_mem_put(m, e);                /* evicts 2 */
    cache_entry_unref(e);
    assert_int_equal(cache_mem_count(m), 3);
    assert_false(has(m, 2, 0));
    assert_true(has(m, 1, 0) && has(m, 3, 0) && has(m, 4, 0));   /* order: 4 3 1 */
    /* one entry twice the size evicts the two least recent */
    e = sized_entry(5, 1000 + sz, 1000);
    cache_mem_put(m, e);
    cache_entry_unref(e);
    assert_true(has(m, 5, 0));
    assert_true(has(m, 4, 0));
    assert_false(has(m, 3, 0));
    assert_false(has(m, 1, 0));
    assert_int_equal(cache_mem_count(m), 2);
    assert_true(cache_mem_bytes(m) <= 3 * sz + sz / 2);
    /* an entry larger than the whole bound is not kept and evicts nothing */
    e = sized_entry(6, 4 * sz, 1000);
    cache_mem_put(m, e);
    assert_false(e->in_memory);
    assert_int_equal(e->refs, 1);
    cache_entry_unref(e);
    assert_false(has(m, 6, 0));
    assert_int_equal(cache_mem_count(m), 2);
    assert_true(has(m, 4, 0) && has(m, 5, 0));
    cache_mem_free(m);
}

static void test_mem_ttl(void **state)
{
    struct cache_mem *m = cache_mem_new(10, 1 << 20);

    (void)state;
    put(m, 1, 1000);
    put(m, 2, 2000);
    assert_true(has(m, 1, 999));
    assert_true(has(m, 2, 999));
    size_t bytes = cache_mem_bytes(m);
    assert_false(has(m, 1, 1000));      /* expires_ms <= now: gone */
    assert_int_equal(cache_mem_count(m), 1);
    assert_true(cache_mem_bytes(m) < bytes);
    assert_false(has(m, 1, 0));         /* dropped, not just hidden */
    assert_true(has(m, 2, 1999));
    assert_false(has(m, 2, 5000));
    assert_int_equal(cache_mem_count(m), 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    cache_mem_free(m);
}

static void test_mem_replace(void **state)
{
    struct cache_mem *m = cache_mem_new(10, 1 << 20);

    (void)state;
    struct cache_entry *a = entry(1, false, "application/json", "{\"v\":\"old\"}", 11, 1000);
    struct cache_entry *b =
        entry(1, false, "application/json", "{\"v\":\"new and longer\"}", 22, 2000);
    cache_mem_put(m, a);
    size_t bytes_a = cache_mem_bytes(m);
    cache_mem_put(m, b);
    assert_int_equal(cache_mem_count(m), 1);
    assert_false(a->in_memory);
    assert_int_equal(a->refs, 1);
    assert_true(b->in_memory);
    assert_int_equal(cache_mem_bytes(m), bytes_a + 11);
    struct cache_entry *g = cache_mem_get(m, a->key, 1500);
    assert_ptr_equal(g, b);
    assert_string_equal(g->body, "{\"v\":\"new and longer\"}");
    cache_entry_unref(g);
    cache_entry_unref(a);
    cache_entry_unref(b);
    /* replacing keeps the other entries */
    put(m, 2, 3000);
    put(m, 3, 3000);
    put(m, 2, 4000);
    assert_int_equal(cache_mem_count(m), 3);
    cache_mem_free(m);
}

static void test_mem_off(void **state)
{
    struct cache_mem *m = cache_mem_new(0, 1 << 20);

    (void)state;
    assert_non_null(m);
    struct cache_entry *e = entry(1, false, "application/json", "{}", 2, 1000);
    cache_mem_put(m, e);
    assert_false(e->in_memory);
    assert_int_equal(e->refs, 1);
    assert_int_equal(cache_mem_count(m), 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    assert_null(cache_mem_get(m, e->key, 0));
    cache_entry_unref(e);
    cache_mem_free(m);
    /* max_bytes 0 keeps nothing either */
    m = cache_mem_new(10, 0);
    put(m, 1, 1000);
    assert_int_equal(cache_mem_count(m), 0);
    assert_false(has(m, 1, 0));
    cache_mem_free(m);
}

static void test_mem_configure(void **state)
{
    struct cache_mem *m = cache_mem_new(10, 1 << 20);

    (void)state;
    for (unsigned i = 1; i <= 5; i++) {
        put(m, i, 1000);
    }
    assert_true(has(m, 2, 0));          /* order: 2 5 4 3 1 */
    cache_mem_configure(m, 2, 1 << 20);
    assert_int_equal(cache_mem_count(m), 2);
    assert_true(has(m, 2, 0) && has(m, 5, 0));
    cache_mem_configure(m, 0, 1 << 20); /* off: empties it */
    assert_int_equal(cache_mem_count(m), 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    put(m, 7, 1000);
    assert_false(has(m, 7, 0));
    cache_mem_configure(m, 4, 1 << 20); /* on again */
    put(m, 7, 1000);
    assert_true(has(m, 7, 0));
    cache_mem_configure(m, 4, 1);       /* a tiny byte bound empties it */
    assert_int_equal(cache_mem_count(m), 0);
    cache_mem_free(m);
}

/* Keys that share a hash bucket (same first 8 bytes). */
static void test_mem_same_bucket(void **state)
{
    struct cache_mem *m = cache_mem_new(100, 1 << 20);
    uint8_t keys[6][CACHE_KEY_LEN];

    (void)state;
    for (int i = 0; i < 6; i++) {
        memset(keys[i], 0x11, CACHE_KEY_LEN);
        keys[i][20] = (uint8_t)i;
        struct cache_entry *e = cache_entry_new(keys[i], false, "", "{}", 2, 1000);
        assert_non_null(e);
        cache_mem_put(m, e);
        cache_entry_unref(e);
    }
    assert_int_equal(cache_mem_count(m), 6);
    for (int i = 0; i < 6; i++) {
        struct cache_entry *e = cache_mem_get(m, keys[i], 0);
        assert_non_null(e);
        assert_memory_equal(e->key, keys[i], CACHE_KEY_LEN);
        cache_entry_unref(e);
    }
    /* expire the middle of the chain, then the rest still answer */
    struct cache_entry *e = cache_entry_new(keys[3], false, "", "{}", 2, 10);
    cache_mem_put(m, e);                /* replaces keys[3] with a short-lived one */
    cache_entry_unref(e);
    assert_null(cache_mem_get(m, keys[3], 10));
    assert_int_equal(cache_mem_count(m), 5);
    for (int i = 0; i < 6; i++) {
        e = cache_mem_get(m, keys[i], 0);
        if ((e != NULL) != (i != 3)) {
            fail_msg("key %d: present %d", i, e != NULL);
        }
        cache_entry_unref(e);
    }
    cache_mem_free(m);
}

/* A reference from get stays valid after eviction and after the tier is freed. */
static void test_mem_refs_outlive(void **state)
{
    struct cache_mem *m = cache_mem_new(1, 1 << 20);

    (void)state;
    put(m, 1, 1000);
    uint8_t key[CACHE_KEY_LEN];
    make_key(key, 1);
    struct cache_entry *held = cache_mem_get(m, key, 0);
    assert_non_null(held);
    put(m, 2, 1000);                    /* evicts 1 */
    assert_false(held->in_memory);
    assert_int_equal(held->refs, 1);
    assert_string_equal(held->body, "{\"n\":1}");
    cache_entry_unref(held);
    make_key(key, 2);
    held = cache_mem_get(m, key, 0);
    assert_non_null(held);
    cache_mem_free(m);
    assert_string_equal(held->body, "{\"n\":1}");
    assert_int_equal(held->refs, 1);
    cache_entry_unref(held);
}

/* A large body keyed once does not pin its buffer (issue 14). */
static void
test_keybuf_released(void **state)
{
    uint8_t k1[CACHE_KEY_LEN], k2[CACHE_KEY_LEN];
    size_t big = 8u << 20;
    char *body = malloc(big);

    (void)state;
    assert_non_null(body);
    memset(body, 'x', big);
    assert_int_equal(cache_raw_key("g", "POST", "/v1/chat/completions", body, big, "cred", k1), 0);
    assert_true(cache_keybuf_bytes() <= 2 * 256 * 1024);
    /* the same bytes key the same again, from a fresh buffer */
    assert_int_equal(cache_raw_key("g", "POST", "/v1/chat/completions", body, big, "cred", k2), 0);
    assert_memory_equal(k1, k2, CACHE_KEY_LEN);
    /* a small one keeps its buffer for the next request */
    assert_int_equal(cache_raw_key("g", "POST", "/p", "{}", 2, NULL, k1), 0);
    assert_true(cache_keybuf_bytes() > 0);
    free(body);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_hex),
        cmocka_unit_test(test_key_canonical),
        cmocka_unit_test(test_key_deterministic),
        cmocka_unit_test(test_key_differs),
        cmocka_unit_test(test_key_credential),
        cmocka_unit_test(test_storable_table),
        cmocka_unit_test(test_storable_stream_prefixes),
        cmocka_unit_test(test_entry_new_copies),
        cmocka_unit_test(test_entry_round_trip),
        cmocka_unit_test(test_entry_truncated),
        cmocka_unit_test(test_entry_corrupt_fields),
        cmocka_unit_test(test_entry_bit_flips),
        cmocka_unit_test(test_mem_put_get),
        cmocka_unit_test(test_mem_evict_by_count),
        cmocka_unit_test(test_mem_evict_by_bytes),
        cmocka_unit_test(test_mem_ttl),
        cmocka_unit_test(test_mem_replace),
        cmocka_unit_test(test_mem_off),
        cmocka_unit_test(test_mem_configure),
        cmocka_unit_test(test_mem_same_bucket),
        cmocka_unit_test(test_mem_refs_outlive),
        cmocka_unit_test(test_keybuf_released),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
