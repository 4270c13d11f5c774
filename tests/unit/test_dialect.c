/*
 * Unit tests for dialect.c: which dialect a path speaks and which paths
 * are cheap; how each recognises a whole stream (an Anthropic stream ends
 * with message_stop, with or without DeepSeek's trailing data: [DONE];
 * every prefix of one is partial), also through cache_storable and a
 * stored entry; how usage is read (OpenAI's last usage object; Anthropic's
 * message_start and message_delta over it, split between the head and the
 * tail of an answer); the error bodies and SSE error events dsgate writes
 * (Anthropic's type for each status); keep-alives, busy statuses and
 * names.  Tables where possible.  Run from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <jansson.h>

#include "cache.h"
#include "dialect.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static const char ANTH_STREAM[] =
    "event: message_start\n"
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\","
    "\"role\":\"assistant\",\"model\":\"deepseek-v4-pro\",\"content\":[],\"stop_reason\":null,"
    "\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_read_input_tokens\":10,"
    "\"cache_creation_input_tokens\":0}}}\n\n"
    "event: content_block_start\n"
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\","
    "\"text\":\"\"}}\n\n"
    "event: ping\ndata: {\"type\": \"ping\"}\n\n"
    "event: content_block_delta\n"
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\","
    "\"text\":\"a \\\"usage\\\":{\\\"input_tokens\\\":999} in text\"}}\n\n"
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"
    "event: message_delta\n"
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\","
    "\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n"
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

/* An exact-size copy, so that ASan sees any read past the end. */
static char *
copy(const char *s, size_t n)
{
    char *b = malloc(n ? n : 1);

    assert_non_null(b);
    memcpy(b, s, n);
    return b;
}

/* ---- paths ---------------------------------------------------------------- */

static void
test_of_path(void **state)
{
    static const struct {
        const char *path;
        enum dialect_id want;
        bool cheap;
    } cases[] = {
        {"/v1/chat/completions", DIALECT_OPENAI, false},
        {"/chat/completions", DIALECT_OPENAI, false},
        {"/v1/embeddings", DIALECT_OPENAI, false},
        {"/v1/models", DIALECT_OPENAI, false},
        {"/", DIALECT_OPENAI, false},
        {"/anthropic/v1/messages", DIALECT_ANTHROPIC, false},
        {"/anthropic/v1/messages/count_tokens", DIALECT_ANTHROPIC, true},
        {"/anthropic/v1/models", DIALECT_ANTHROPIC, false},
        {"/anthropic", DIALECT_ANTHROPIC, false},
        {"/v1/messages", DIALECT_ANTHROPIC, false},
        {"/v1/messages/count_tokens", DIALECT_ANTHROPIC, true},
        {"/v1/messages/batches", DIALECT_ANTHROPIC, false},
        {"/anthropicx/v1/messages", DIALECT_OPENAI, false},
        {"/v1/messagesx", DIALECT_OPENAI, false},
        {"/v2/messages", DIALECT_OPENAI, false},
        {"/v1/chat/completions/count_tokens", DIALECT_OPENAI, false},
        {"/x/anthropic/v1/messages", DIALECT_OPENAI, false},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        const struct dialect *d = dialect_of_path(cases[i].path);
        if (d->id != cases[i].want) {
            fail_msg("%s: dialect %s", cases[i].path, d->name);
        }
        if (d->cheap(cases[i].path) != cases[i].cheap) {
            fail_msg("%s: cheap %d", cases[i].path, !cases[i].cheap);
        }
        if (!d->matches(cases[i].path)) {
            fail_msg("%s: its own dialect does not match it", cases[i].path);
        }
    }
    assert_ptr_equal(dialect_of_path(NULL), &dialect_openai);
    assert_int_equal(dialect_by_name("openai"), DIALECT_OPENAI);
    assert_int_equal(dialect_by_name("Anthropic"), DIALECT_ANTHROPIC);
    assert_int_equal(dialect_by_name("claude"), -1);
    assert_ptr_equal(dialect_by_id(DIALECT_ANTHROPIC), &dialect_anthropic);
}

static void
test_busy_keepalive(void **state)
{
    (void)state;
    assert_true(dialect_busy(&dialect_anthropic, 529));
    assert_false(dialect_busy(&dialect_anthropic, 503));
    assert_false(dialect_busy(&dialect_openai, 529));
    assert_string_equal(dialect_openai.sse_keepalive, ": keep-alive\n\n");
    assert_string_equal(dialect_anthropic.sse_keepalive,
                        "event: ping\ndata: {\"type\": \"ping\"}\n\n");
    assert_string_equal(dialect_anthropic.tokens[0].header, "x-api-key");
    assert_string_equal(dialect_openai.tokens[0].header, "Authorization");
    assert_null(dialect_openai.tokens[1].header);
}

/* ---- whole streams ---------------------------------------------------------- */

static const struct complete_case {
    const char *name;
    const struct dialect *d;
    const char *body;
    bool ok;
} complete_cases[] = {
    {"anthropic", &dialect_anthropic, ANTH_STREAM, true},
    {"anthropic, trailing done", &dialect_anthropic,
     "event: message_start\ndata: {\"type\":\"message_start\"}\n\n"
     "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\ndata: [DONE]\n\n",
     true},
    {"anthropic, done in the stop event", &dialect_anthropic,
     "event: message_stop\ndata: {\"type\":\"message_stop\"}\ndata: [DONE]\n\n", true},
    {"anthropic, done without newline", &dialect_anthropic,
     "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\ndata: [DONE]", true},
    {"anthropic, crlf", &dialect_anthropic,
     "event: message_start\r\ndata: {\"type\":\"message_start\"}\r\n\r\n"
     "event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n",
     true},
    {"anthropic, no space after colon", &dialect_anthropic,
     "event:message_stop\ndata:{\"type\": \"message_stop\"}\n\n", true},
    {"anthropic, data only", &dialect_anthropic, "data: {\"type\":\"message_stop\"}\n\n", true},
    {"anthropic, keep-alive comment after stop", &dialect_anthropic,
     "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n: keep-alive\n\n", false},
    {"anthropic, ping last", &dialect_anthropic,
     "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
     "event: ping\ndata: {\"type\":\"ping\"}\n\n",
     false},
    {"anthropic, stop named, other data", &dialect_anthropic,
     "event: message_stop\ndata: {\"type\":\"message_delta\"}\n\n", false},
    {"anthropic, stop data, other name", &dialect_anthropic,
     "event: message_delta\ndata: {\"type\":\"message_stop\"}\n\n", false},
    {"anthropic, event line only", &dialect_anthropic, "event: message_stop\n\n", false},
    {"anthropic, cut after delta", &dialect_anthropic,
     "event: message_delta\ndata: {\"type\":\"message_delta\"}\n\n", false},
    {"anthropic, error last", &dialect_anthropic,
     "event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: error\n"
     "data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"x\"}}\n\n",
     false},
    {"anthropic, only done", &dialect_anthropic, "data: [DONE]\n\n", false},
    {"anthropic, empty", &dialect_anthropic, "", false},
    {"anthropic, openai stream", &dialect_anthropic, "data: {\"a\":1}\n\ndata: [DONE]\n\n",
     false},
    {"openai", &dialect_openai, "data: {\"a\":1}\n\ndata: [DONE]\n\n", true},
    {"openai, anthropic stream", &dialect_openai, ANTH_STREAM, false},
};

static void
test_stream_complete(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(complete_cases); i++) {
        const struct complete_case *c = &complete_cases[i];
        size_t len = strlen(c->body);
        char *b = copy(c->body, len);
        bool ok = c->d->stream_complete(b, len);
        if (ok != c->ok) {
            fail_msg("'%s': complete %d, want %d", c->name, ok, c->ok);
        }
        if (c->ok && !dialect_stream_complete_any(b, len)) {
            fail_msg("'%s': not complete in any dialect", c->name);
        }
        free(b);
    }
}

/* Every prefix of an Anthropic stream before its message_stop data is whole is partial. */
static void
test_stream_prefixes(void **state)
{
    size_t len = strlen(ANTH_STREAM), start;
    const char *stop = strstr(ANTH_STREAM, "data: {\"type\":\"message_stop\"}");
    size_t complete = (size_t)(stop - ANTH_STREAM) + strlen("data: {\"type\":\"message_stop\"}");

    (void)state;
    for (size_t n = 0; n <= len; n++) {
        char *b = copy(ANTH_STREAM, n);
        bool ok = cache_storable(&dialect_anthropic, true, b, n, &start);
        if (ok != (n >= complete)) {
            fail_msg("prefix of %zu bytes: storable %d", n, ok);
        }
        free(b);
    }
}

static void
test_storable(void **state)
{
    static const char ka[] = ": keep-alive\n\n\n";
    char body[sizeof(ka) + sizeof(ANTH_STREAM)];
    size_t start = 0;

    (void)state;
    snprintf(body, sizeof(body), "%s%s", ka, ANTH_STREAM);
    assert_true(cache_storable(&dialect_anthropic, true, body, strlen(body), &start));
    assert_int_equal(start, strlen(ka));
    assert_false(cache_storable(&dialect_openai, true, body, strlen(body), &start));
    /* non-stream: an Anthropic error is not stored, a message is */
    static const char err[] =
        "{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}";
    static const char msg[] = "{\"id\":\"msg_1\",\"type\":\"message\",\"content\":[]}";
    assert_false(cache_storable(&dialect_anthropic, false, err, strlen(err), &start));
    assert_true(cache_storable(&dialect_anthropic, false, msg, strlen(msg), &start));

    /* an entry of each dialect survives the Redis record */
    uint8_t key[CACHE_KEY_LEN] = {1, 2, 3};
    struct cache_entry *e = cache_entry_new(key, true, "text/event-stream", ANTH_STREAM,
                                            strlen(ANTH_STREAM), 0);
    size_t n;
    char *rec = cache_entry_encode(e, &n);
    assert_non_null(rec);
    struct cache_entry *d = cache_entry_decode(key, rec, n);
    assert_non_null(d);
    assert_int_equal(d->body_len, strlen(ANTH_STREAM));
    cache_entry_unref(d);
    cache_entry_unref(e);
    free(rec);
}

/* ---- usage -------------------------------------------------------------------- */

static const struct usage_case {
    const char *name;
    const struct dialect *d;
    bool sse;
    const char *head; /* NULL: the same as the tail */
    const char *tail;
    int64_t want[TOK_KINDS];
} usage_cases[] = {
    {"openai", &dialect_openai, false, NULL,
     "{\"id\":\"c\",\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,"
     "\"total_tokens\":10,\"prompt_cache_hit_tokens\":4,\"prompt_cache_miss_tokens\":3}}",
     {7, 3, 4, 3, -1}},
    {"openai stream, null usage before", &dialect_openai, true, NULL,
     "data: {\"usage\":null}\n\ndata: {\"usage\": {\"prompt_tokens\": 5,"
     " \"completion_tokens\": 2}}\n\ndata: [DONE]\n\n",
     {5, 2, -1, -1, -1}},
    {"openai reads no anthropic fields", &dialect_openai, false, NULL,
     "{\"usage\":{\"input_tokens\":7,\"output_tokens\":3}}", {-1, -1, -1, -1, -1}},
    {"anthropic message", &dialect_anthropic, false, NULL,
     "{\"id\":\"msg_1\",\"type\":\"message\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"}],"
     "\"usage\":{\"input_tokens\":12,\"cache_creation_input_tokens\":2,"
     "\"cache_read_input_tokens\":100,\"cache_creation\":{\"ephemeral_5m_input_tokens\":2},"
     "\"output_tokens\":6,\"server_tool_use\":{\"web_search_requests\":0}}}",
     {12, 6, 100, -1, 2}},
    {"anthropic stream, whole", &dialect_anthropic, true, NULL, ANTH_STREAM, {25, 15, 10, -1, 0}},
    {"anthropic stream, split", &dialect_anthropic, true,
     "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":"
     "{\"input_tokens\":30,\"output_tokens\":1,\"cache_read_input_tokens\":8}}}\n\n"
     "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"lo",
     "ng text\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":"
     "{\"output_tokens\":42}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
     {30, 42, 8, -1, -1}},
    {"anthropic stream, delta with input too", &dialect_anthropic, true,
     "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":30,"
     "\"output_tokens\":1}}}\n\n",
     "data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":31,\"output_tokens\":9,"
     "\"cache_read_input_tokens\":5}}\n\n",
     {31, 9, 5, -1, -1}},
    {"anthropic stream, head cut in message_start", &dialect_anthropic, true,
     "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tok",
     "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n",
     {-1, 9, -1, -1, -1}},
    {"anthropic, usage only in text", &dialect_anthropic, false, NULL,
     "{\"content\":[{\"text\":\"\\\"usage\\\":{\\\"input_tokens\\\":5}\"}]}",
     {-1, -1, -1, -1, -1}},
    {"anthropic, negative and fractional ignored", &dialect_anthropic, false, NULL,
     "{\"usage\":{\"input_tokens\":-1,\"output_tokens\":2.5}}", {-1, -1, -1, -1, -1}},
    {"nothing", &dialect_anthropic, true, NULL, "", {-1, -1, -1, -1, -1}},
};

static void
test_usage(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(usage_cases); i++) {
        const struct usage_case *c = &usage_cases[i];
        const char *h = c->head ? c->head : c->tail;
        char *head = copy(h, strlen(h)), *tail = copy(c->tail, strlen(c->tail));
        int64_t t[TOK_KINDS] = {-1, -1, -1, -1, -1};
        c->d->usage(head, strlen(h), tail, strlen(c->tail), c->sse, t);
        for (int k = 0; k < TOK_KINDS; k++) {
            if (t[k] != c->want[k]) {
                fail_msg("'%s': %s %lld, want %lld", c->name, token_kind_name[k], (long long)t[k],
                         (long long)c->want[k]);
            }
        }
        free(head);
        free(tail);
    }
    assert_string_equal(token_kind_name[TOK_CACHE_WRITE], "prompt_cache_write");
}

/* ---- errors --------------------------------------------------------------------- */

static json_t *
parse_buf(struct evbuffer *b, size_t skip)
{
    size_t n = evbuffer_get_length(b);
    const char *p = (const char *)evbuffer_pullup(b, -1);
    json_t *j = json_loadb(p + skip, n - skip, JSON_DISABLE_EOF_CHECK, NULL);

    assert_non_null(j);
    return j;
}

static void
test_error_shapes(void **state)
{
    static const struct {
        int status;
        const char *type;
    } types[] = {
        {400, "invalid_request_error"}, {401, "authentication_error"},
        {403, "permission_error"},      {404, "not_found_error"},
        {408, "invalid_request_error"}, {413, "request_too_large"},
        {429, "rate_limit_error"},      {500, "api_error"},
        {502, "api_error"},             {503, "overloaded_error"},
        {504, "api_error"},             {529, "overloaded_error"},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(types); i++) {
        struct dialect_error e = {.status = types[i].status,
                                  .type = "upstream_error",
                                  .code = "some_code",
                                  .message = "a \"quoted\"\nmessage"};
        struct evbuffer *b = evbuffer_new();
        dialect_anthropic.error_body(b, &e);
        json_t *j = parse_buf(b, 0);
        assert_string_equal(json_string_value(json_object_get(j, "type")), "error");
        json_t *err = json_object_get(j, "error");
        if (strcmp(json_string_value(json_object_get(err, "type")), types[i].type) != 0) {
            fail_msg("status %d: type %s, want %s", types[i].status,
                     json_string_value(json_object_get(err, "type")), types[i].type);
        }
        assert_string_equal(json_string_value(json_object_get(err, "message")), e.message);
        assert_int_equal(json_object_size(j), 2);
        json_decref(j);
        /* the same as an SSE event */
        evbuffer_drain(b, evbuffer_get_length(b));
        dialect_anthropic.sse_error(b, &e);
        const char *p = (const char *)evbuffer_pullup(b, -1);
        size_t n = evbuffer_get_length(b);
        assert_true(n > 20 && memcmp(p, "event: error\ndata: ", 19) == 0);
        assert_true(memcmp(p + n - 2, "\n\n", 2) == 0);
        assert_null(memchr(p + 19, '\n', n - 21)); /* one data line */
        j = parse_buf(b, 19);
        assert_string_equal(json_string_value(json_object_get(json_object_get(j, "error"), "type")),
                            types[i].type);
        json_decref(j);
        evbuffer_free(b);
    }

    /* OpenAI: dsgate's type and code as given; "status" in an SSE event when asked */
    struct dialect_error e = {.status = 429, .type = "rate_limit_error", .code = "queue_full",
                              .message = "wait"};
    struct evbuffer *b = evbuffer_new();
    dialect_openai.error_body(b, &e);
    size_t n = evbuffer_get_length(b);
    assert_memory_equal(evbuffer_pullup(b, -1),
                        "{\"error\":{\"message\":\"wait\",\"type\":\"rate_limit_error\","
                        "\"code\":\"queue_full\"}}\n",
                        n);
    evbuffer_drain(b, n);
    e.with_status = true;
    dialect_openai.sse_error(b, &e);
    static const char want[] = "event: error\ndata: {\"error\":{\"message\":\"wait\","
                               "\"type\":\"rate_limit_error\",\"code\":\"queue_full\","
                               "\"status\":429}}\n\n";
    assert_int_equal(evbuffer_get_length(b), strlen(want));
    assert_memory_equal(evbuffer_pullup(b, -1), want, strlen(want));
    evbuffer_free(b);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_of_path),
        cmocka_unit_test(test_busy_keepalive),
        cmocka_unit_test(test_stream_complete),
        cmocka_unit_test(test_stream_prefixes),
        cmocka_unit_test(test_storable),
        cmocka_unit_test(test_usage),
        cmocka_unit_test(test_error_shapes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
