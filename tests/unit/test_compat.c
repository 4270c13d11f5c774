/*
 * Unit tests for compat.c (compat.reasoning_content: restore): the plan
 * and the splice over a table of request bodies (the new member goes into
 * exactly the assistant messages that made tool calls without their
 * reasoning, every other byte stays; several messages, escaped strings,
 * white space, null and "" values, bodies where nothing may change), the
 * splice together with an alias rename of the model, the capture of
 * streamed and whole answers (fed in every split), and the memory round
 * trip within one credential's scope and not across.  Run from the
 * repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "compat.h"
#include "conf.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* ---- helpers ------------------------------------------------------------ */

struct known {
    const char *id;
    const char *reasoning; /* decoded */
};

static char *json_token(const char *s)
{
    json_t *j = json_string(s);
    char *q = json_dumps(j, JSON_ENCODE_ANY);

    json_decref(j);
    assert_non_null(q);
    return q;
}

/* Give each target the reasoning KNOWN has for one of its ids. */
static void give(struct compat_target *t, size_t nt, const struct known *k, size_t nk)
{
    for (size_t i = 0; i < nt; i++) {
        for (size_t j = 0; j < t[i].nids && !t[i].value; j++) {
            for (size_t x = 0; x < nk && k[x].id; x++) {
                if (strcmp(k[x].id, t[i].ids[j]) == 0) {
                    t[i].value = json_token(k[x].reasoning);
                    break;
                }
            }
        }
    }
}

/* BODY restored from KNOWN (NULL: nothing changes), MODEL_OFF moved along. */
static char *restore(const char *body, const struct known *k, size_t nk, size_t *model_off)
{
    struct compat_target *t;
    size_t nt, n;

    assert_int_equal(compat_plan(body, strlen(body), &t, &nt), 0);
    give(t, nt, k, nk);
    char *out = compat_splice(body, strlen(body), t, nt, &n, model_off);
    assert_non_null(out);
    assert_int_equal(n, strlen(out));
    compat_targets_free(t, nt);
    return out;
}

/* ---- the plan and the splice: a table ------------------------------------ */

static const struct known K[] = {
    {"call_1", "I should look at the weather."},
    {"call_2", "Now the time."},
    {"call/3", "quote \" backslash \\ newline \n tab \t unicode \xc3\xa9 \xe2\x82\xac"},
};

struct splice_case {
    const char *name;
    const char *in;
    const char *out; /* NULL: the same bytes */
    size_t targets;  /* what the plan finds (known or not) */
};

static const struct splice_case CASES[] = {
    {"one turn",
     "{\"model\":\"deepseek-reasoner\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
     "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"call_1\",\"type\":"
     "\"function\",\"function\":{\"name\":\"w\",\"arguments\":\"{}\"}}]},"
     "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"sunny\"}]}",
     "{\"model\":\"deepseek-reasoner\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
     "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"call_1\",\"type\":"
     "\"function\",\"function\":{\"name\":\"w\",\"arguments\":\"{}\"}}],"
     "\"reasoning_content\":\"I should look at the weather.\"},"
     "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"sunny\"}]}",
     1},
    {"two turns, two calls in the second, found by its second id",
     "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_1\"}]},"
     "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"x\"},"
     "{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_x\"},{\"id\":\"call_2\"}]}],"
     "\"model\":\"m\"}",
     "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_1\"}],"
     "\"reasoning_content\":\"I should look at the weather.\"},"
     "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"x\"},"
     "{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_x\"},{\"id\":\"call_2\"}],"
     "\"reasoning_content\":\"Now the time.\"}],\"model\":\"m\"}",
     2},
    {"one known, one not",
     "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"nope\"}]},"
     "{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_2\"}]}]}",
     "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"nope\"}]},"
     "{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_2\"}],"
     "\"reasoning_content\":\"Now the time.\"}]}",
     2},
    {"a null value is replaced in place; \"\" is an answer and stays",
     "{\"messages\":[{\"role\":\"assistant\",\"reasoning_content\" : null ,\"tool_calls\":"
     "[{\"id\":\"call_1\"}]},{\"role\":\"assistant\",\"reasoning_content\":\"\","
     "\"tool_calls\":[{\"id\":\"call_2\"}]}]}",
     "{\"messages\":[{\"role\":\"assistant\",\"reasoning_content\" : \"I should look at the "
     "weather.\" ,\"tool_calls\":[{\"id\":\"call_1\"}]},{\"role\":\"assistant\","
     "\"reasoning_content\":\"\",\"tool_calls\":[{\"id\":\"call_2\"}]}]}",
     1},
    {"white space of a pretty body stays where it was",
     "{\n  \"messages\": [\n    {\n      \"role\": \"assistant\",\n      \"tool_calls\": [\n"
     "        {\"id\": \"call_1\"}\n      ]\n    }\n  ]\n}\n",
     "{\n  \"messages\": [\n    {\n      \"role\": \"assistant\",\n      \"tool_calls\": [\n"
     "        {\"id\": \"call_1\"}\n      ],\"reasoning_content\":\"I should look at the "
     "weather.\"\n    }\n  ]\n}\n",
     1},
    {"escapes: in the names, the role, the id and the reasoning",
     "{\"messages\":[{\"rol\\u0065\":\"assist\\u0061nt\",\"tool_c\\u0061lls\":[{\"id\":"
     "\"call\\/3\"}],\"content\":\"say \\\"hi\\\" \\u00e9\"}]}",
     NULL, /* "tool_calls" is escaped: the cheap check does not see a tool call */
     0},
    {"escapes: an escaped id and reasoning",
     "{\"messages\":[{\"role\":\"assist\\u0061nt\",\"tool_calls\":[{\"id\":\"call\\/3\"}],"
     "\"content\":\"say \\\"hi\\\" \\u00e9\"}]}",
     "{\"messages\":[{\"role\":\"assist\\u0061nt\",\"tool_calls\":[{\"id\":\"call\\/3\"}],"
     "\"content\":\"say \\\"hi\\\" \\u00e9\",\"reasoning_content\":\"quote \\\" backslash \\\\ "
     "newline \\n tab \\t unicode \xc3\xa9 \xe2\x82\xac\"}]}",
     1},
    {"reasoning already there",
     "{\"messages\":[{\"role\":\"assistant\",\"reasoning_content\":\"kept\",\"tool_calls\":"
     "[{\"id\":\"call_1\"}]}]}",
     NULL, 0},
    {"reasoning given twice: left alone",
     "{\"messages\":[{\"role\":\"assistant\",\"reasoning_content\":null,\"reasoning_content\":"
     "null,\"tool_calls\":[{\"id\":\"call_1\"}]}]}",
     NULL, 0},
    {"an assistant turn without tool calls",
     "{\"messages\":[{\"role\":\"assistant\",\"content\":\"hello\"},{\"role\":\"user\","
     "\"content\":\"the \\\"tool_calls\\\" of an \\\"assistant\\\"\"}]}",
     NULL, 0},
    {"empty tool_calls",
     "{\"messages\":[{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[]}]}", NULL, 0},
    {"tool calls without ids",
     "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"type\":\"function\"}]}]}", NULL,
     0},
    {"a user message that says tool_calls",
     "{\"messages\":[{\"role\":\"user\",\"tool_calls\":[{\"id\":\"call_1\"}]},"
     "{\"role\":\"assistant\",\"content\":\"x\"}]}",
     NULL, 0},
    {"messages is not an array",
     "{\"messages\":{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_1\"}]}}", NULL, 0},
    {"not JSON", "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_1\"}]}",
     NULL, 0},
    {"a nested messages array is not the request's",
     "{\"x\":{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_1\"}]}]},"
     "\"messages\":[]}",
     NULL, 0},
    {"the last of two messages members counts, as parsers take it",
     "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_2\"}]}],"
     "\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_1\"}]}]}",
     "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_2\"}]}],"
     "\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_1\"}],"
     "\"reasoning_content\":\"I should look at the weather.\"}]}",
     1},
    {"nothing known", "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"z\"}]}]}",
     NULL, 1},
};

static void test_splice_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(CASES); i++) {
        const struct splice_case *c = &CASES[i];
        struct compat_target *t;
        size_t nt;

        assert_int_equal(compat_plan(c->in, strlen(c->in), &t, &nt), 0);
        if (nt != c->targets) {
            fail_msg("%s: %zu targets, want %zu", c->name, nt, c->targets);
        }
        compat_targets_free(t, nt);
        char *out = restore(c->in, K, NELEM(K), NULL);
        const char *want = c->out ? c->out : c->in;
        if (strcmp(out, want) != 0) {
            fail_msg("%s:\n got  %s\n want %s", c->name, out, want);
        }
        /* what comes out is JSON, and every message that had its reasoning still has it */
        json_t *j = json_loads(out, 0, NULL);
        if (c->out && !j) {
            fail_msg("%s: the result is not JSON: %s", c->name, out);
        }
        json_decref(j);
        free(out);
    }
}

/* The bytes outside the inserted member are the client's, for a large body too. */
static void test_splice_rest_identical(void **state)
{
    const char *head = "{\"model\":\"deepseek-reasoner\",\"messages\":[{\"role\":\"assistant\","
                       "\"tool_calls\":[{\"id\":\"call_1\"}]";
    const char *tail = "},{\"role\":\"user\",\"content\":\"%s\"}],\"temperature\":1.0E0}";
    size_t fill = 200000;
    char *big = malloc(fill + 1);
    char *body = malloc(strlen(head) + strlen(tail) + fill + 1);

    (void)state;
    memset(big, 'a', fill);
    big[fill] = '\0';
    strcpy(body, head);
    sprintf(body + strlen(head), tail, big);
    char *out = restore(body, K, NELEM(K), NULL);
    char *tok = json_token(K[0].reasoning);
    size_t hl = strlen(head), add = strlen(",\"reasoning_content\":") + strlen(tok);
    assert_int_equal(strlen(out), strlen(body) + add);
    assert_memory_equal(out, body, hl);
    assert_memory_equal(out + hl, ",\"reasoning_content\":", 21);
    assert_memory_equal(out + hl + 21, tok, strlen(tok));
    assert_string_equal(out + hl + add, body + hl);
    free(tok);
    free(out);
    free(body);
    free(big);
}

/* attempt.c's rename of the model, as it splices it: at MODEL_OFF, LEN bytes. */
static char *rename_model(const char *body, size_t off, size_t len, const char *to)
{
    size_t bl = strlen(body), tl = strlen(to);
    char *out = malloc(bl - len + tl + 1);

    memcpy(out, body, off);
    memcpy(out + off, to, tl);
    strcpy(out + off + tl, body + off + len);
    return out;
}

/* The restore moves the model's offset when the model comes after the messages. */
static void test_splice_with_alias(void **state)
{
    static const struct {
        const char *in, *want;
    } cases[] = {
        {"{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_1\"}]},"
         "{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_2\"}]}],\"model\":\"pro\","
         "\"stream\":true}",
         "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_1\"}],"
         "\"reasoning_content\":\"I should look at the weather.\"},{\"role\":\"assistant\","
         "\"tool_calls\":[{\"id\":\"call_2\"}],\"reasoning_content\":\"Now the time.\"}],"
         "\"model\":\"DeepSeek-R1\",\"stream\":true}"},
        {"{\"model\":\"pro\",\"messages\":[{\"role\":\"assistant\",\"tool_calls\":"
         "[{\"id\":\"call_1\"}]}]}",
         "{\"model\":\"DeepSeek-R1\",\"messages\":[{\"role\":\"assistant\",\"tool_calls\":"
         "[{\"id\":\"call_1\"}],\"reasoning_content\":\"I should look at the weather.\"}]}"},
        {"{\"messages\":[{\"role\":\"assistant\",\"reasoning_content\":null,\"tool_calls\":"
         "[{\"id\":\"call_2\"}]}],  \"model\" : \"pro\"}",
         "{\"messages\":[{\"role\":\"assistant\",\"reasoning_content\":\"Now the time.\","
         "\"tool_calls\":[{\"id\":\"call_2\"}]}],  \"model\" : \"DeepSeek-R1\"}"},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        const char *in = cases[i].in;
        size_t off = (size_t)(strstr(in, "\"pro\"") - in), len = 5;
        char *restored = restore(in, K, NELEM(K), &off);
        assert_memory_equal(restored + off, "\"pro\"", len);
        char *out = rename_model(restored, off, len, "\"DeepSeek-R1\"");
        assert_string_equal(out, cases[i].want);
        free(out);
        free(restored);
    }
}

/* More assistant turns than COMPAT_MAX_TARGETS: the first ones are planned, the rest go as sent. */
static void test_plan_bounded(void **state)
{
    size_t n = COMPAT_MAX_TARGETS + 10;
    char *b = malloc(64 * n + 64), *p = b;
    struct compat_target *t;
    size_t nt;

    (void)state;
    p += sprintf(p, "{\"messages\":[");
    for (size_t i = 0; i < n; i++) {
        p += sprintf(p, "%s{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"c%zu\"}]}",
                     i ? "," : "", i);
    }
    sprintf(p, "]}");
    assert_int_equal(compat_plan(b, strlen(b), &t, &nt), 0);
    assert_int_equal(nt, COMPAT_MAX_TARGETS);
    assert_string_equal(t[0].ids[0], "c0");
    assert_string_equal(t[nt - 1].ids[0], "c63");
    compat_targets_free(t, nt);
    free(b);
}

/* ---- capture ------------------------------------------------------------- */

static const char STREAM[] =
    ": keep-alive\n\n"
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\","
    "\"content\":null,\"reasoning_content\":\"\"}}]}\n\n"
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":"
    "\"Let me \\\"check\\\"\"}}]}\n\n"
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":"
    "\" the w\\u00e9ather.\\n\"}}]}\n\n"
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,"
    "\"id\":\"call_a\",\"type\":\"function\",\"function\":{\"name\":\"w\",\"arguments\":\"\"}}]}}]}\n\n"
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,"
    "\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]}}]}\n\n"
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,"
    "\"id\":\"call_b\",\"function\":{\"name\":\"t\",\"arguments\":\"{}\"}}]}}]}\n\n"
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":"
    "\"tool_calls\"}],\"usage\":{\"prompt_tokens\":1}}\n\n"
    "data: [DONE]\n\n";
static const char STREAM_REASONING[] = "Let me \"check\" the w\xc3\xa9" "ather.\n";

static char *capture(bool sse, const char *p, size_t len, size_t piece, size_t max,
                     size_t *nids)
{
    struct compat_capture c;

    compat_capture_init(&c, sse, max);
    for (size_t i = 0; i < len; i += piece) {
        compat_capture_feed(&c, p + i, len - i < piece ? len - i : piece);
    }
    char *v = compat_capture_result(&c);
    *nids = c.nids;
    if (c.nids >= 2) {
        assert_string_equal(c.ids[0], "call_a");
        assert_string_equal(c.ids[1], "call_b");
    }
    compat_capture_free(&c);
    return v;
}

static void test_capture_stream_every_split(void **state)
{
    char *want = json_token(STREAM_REASONING);
    size_t nids;

    (void)state;
    for (size_t piece = 1; piece <= sizeof(STREAM); piece++) {
        char *v = capture(true, STREAM, sizeof(STREAM) - 1, piece, 4096, &nids);
        if (!v || strcmp(v, want) != 0) {
            fail_msg("pieces of %zu: got %s", piece, v ? v : "(nothing)");
        }
        assert_int_equal(nids, 2);
        free(v);
    }
    free(want);
}

static void test_capture_stream_crlf(void **state)
{
    char *crlf = malloc(2 * sizeof(STREAM)), *o = crlf;
    size_t nids;

    (void)state;
    for (const char *p = STREAM; *p; p++) {
        if (*p == '\n') {
            *o++ = '\r';
        }
        *o++ = *p;
    }
    *o = '\0';
    char *v = capture(true, crlf, strlen(crlf), 7, 4096, &nids);
    char *want = json_token(STREAM_REASONING);
    assert_non_null(v);
    assert_string_equal(v, want);
    free(want);
    free(v);
    free(crlf);
}

static void test_capture_stream_nothing(void **state)
{
    size_t nids, cut = strstr(STREAM, "data: [DONE]") - STREAM;

    (void)state;
    /* not complete: no [DONE] */
    assert_null(capture(true, STREAM, cut, 64, 4096, &nids));
    /* the reasoning is longer than the bound */
    assert_null(capture(true, STREAM, sizeof(STREAM) - 1, 64, 10, &nids));
    /* no tool calls */
    static const char plain[] =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"hm\"}}]}\n\n"
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
    assert_null(capture(true, plain, sizeof(plain) - 1, 5, 4096, &nids));
    /* tool calls, no reasoning (a non-thinking model) */
    static const char noreason[] =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"id\":\"x\"}]}}]}\n\n"
        "data: [DONE]\n\n";
    assert_null(capture(true, noreason, sizeof(noreason) - 1, 5, 4096, &nids));
}

static const char WHOLE[] =
    "{\"id\":\"c\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":"
    "{\"role\":\"assistant\",\"content\":\"\",\"reasoning_content\":\"Let me \\\"check\\\" "
    "the w\\u00e9ather.\\n\",\"tool_calls\":[{\"id\":\"call_a\",\"type\":\"function\","
    "\"function\":{\"name\":\"w\",\"arguments\":\"{}\"}},{\"id\":\"call_b\",\"type\":"
    "\"function\",\"function\":{\"name\":\"t\",\"arguments\":\"{}\"}}]},\"finish_reason\":"
    "\"tool_calls\"}]}";

static void test_capture_whole(void **state)
{
    char *want = json_token(STREAM_REASONING);
    size_t nids;

    (void)state;
    for (size_t piece = 1; piece < sizeof(WHOLE); piece += 13) {
        char *v = capture(false, WHOLE, sizeof(WHOLE) - 1, piece, 4096, &nids);
        assert_non_null(v);
        assert_string_equal(v, want);
        assert_int_equal(nids, 2);
        free(v);
    }
    /* the whole answer over 4 * max */
    assert_null(capture(false, WHOLE, sizeof(WHOLE) - 1, 50, 16, &nids));
    /* an answer without tool calls */
    static const char plain[] = "{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
                                "\"content\":\"hi\",\"reasoning_content\":\"hm\"}}]}";
    assert_null(capture(false, plain, sizeof(plain) - 1, 50, 4096, &nids));
    free(want);
}

/* ---- the memory, by scope ------------------------------------------------- */

static struct conf *restore_conf(void)
{
    struct conf *c = conf_defaults();

    c->compat.reasoning_content = COMPAT_REASONING_RESTORE;
    return c;
}

/* Answer WHOLE for CRED, then ask with a body lacking call_b's reasoning. */
static void test_memory_scope(void **state)
{
    static const char ask[] = "{\"model\":\"deepseek-reasoner\",\"tools\":[],\"messages\":["
                              "{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_b\"}]}]}";
    struct conf *c = restore_conf();
    struct compat *m = compat_new(c);

    (void)state;
    assert_non_null(m);
    assert_true(compat_wanted(m, "/v1/chat/completions"));
    assert_true(compat_wanted(m, "/chat/completions"));
    assert_false(compat_wanted(m, "/v1/completions"));
    /* the answer: a request with tools, for the key "sk-a" */
    struct compat_req *q = compat_req_new(m, "sk-a", ask, sizeof(ask) - 1);
    assert_non_null(q);
    compat_answer_feed(q, false, WHOLE, sizeof(WHOLE) - 1);
    compat_answer_done(q, NULL);
    compat_req_free(q);

    static const struct {
        const char *cred;
        bool restored;
    } asks[] = {{"sk-a", true}, {"sk-b", false}, {NULL, false}};
    for (size_t i = 0; i < NELEM(asks); i++) {
        char *body = strdup(ask);
        size_t len = strlen(body), moff = 10;
        q = compat_req_new(m, asks[i].cred, body, len);
        assert_non_null(q);
        assert_false(compat_fetch(q, NULL, NULL, NULL)); /* memory answers at once */
        assert_int_equal(compat_apply(q, &body, &len, &moff), asks[i].restored ? 1 : 0);
        assert_int_equal(compat_restored(q), asks[i].restored ? 1 : 0);
        assert_int_equal(moff, 10);
        if (asks[i].restored) {
            assert_non_null(strstr(body, "\"reasoning_content\":\"Let me \\\"check\\\" the "
                                         "w\xc3\xa9" "ather.\\n\"}]}"));
        } else {
            assert_string_equal(body, ask);
        }
        compat_req_free(q);
        free(body);
    }

    /* off by reload: the memory goes, nothing is restored */
    c->compat.reasoning_content = COMPAT_REASONING_OFF;
    compat_configure(m, c);
    assert_false(compat_wanted(m, "/v1/chat/completions"));
    c->compat.reasoning_content = COMPAT_REASONING_RESTORE;
    compat_configure(m, c);
    q = compat_req_new(m, "sk-a", ask, sizeof(ask) - 1);
    char *body = strdup(ask);
    size_t len = strlen(body);
    assert_false(compat_fetch(q, NULL, NULL, NULL));
    assert_int_equal(compat_apply(q, &body, &len, NULL), 0);
    compat_req_free(q);
    free(body);
    compat_free(m);
    conf_free(c);
}

/* A request with nothing to restore and no tools has no part at all. */
static void test_req_nothing(void **state)
{
    static const char plain[] = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":"
                                "\"hi\"}]}";
    struct conf *c = restore_conf();
    struct compat *m = compat_new(c);

    (void)state;
    assert_null(compat_req_new(m, "k", plain, sizeof(plain) - 1));
    compat_free(m);
    conf_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_splice_table),
        cmocka_unit_test(test_splice_rest_identical),
        cmocka_unit_test(test_splice_with_alias),
        cmocka_unit_test(test_plan_bounded),
        cmocka_unit_test(test_capture_stream_every_split),
        cmocka_unit_test(test_capture_stream_crlf),
        cmocka_unit_test(test_capture_stream_nothing),
        cmocka_unit_test(test_capture_whole),
        cmocka_unit_test(test_memory_scope),
        cmocka_unit_test(test_req_nothing),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
