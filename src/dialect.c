/*
 * dialect: the OpenAI and Anthropic tables (see dialect.h).
 *
 *   OpenAI stream     data: {...}\n\n ... data: [DONE]\n\n
 *                     usage: the last "usage" object (the final chunk)
 *   Anthropic stream  event: message_start ... event: message_stop\n
 *                     data: {"type":"message_stop"}\n\n, maybe a trailing
 *                     data: [DONE] (DeepSeek adds one)
 *                     usage: message_start's message.usage (input, first
 *                     output count), then message_delta's usage (the
 *                     final, cumulative counts) over it
 *   non-stream        one "usage" object, the last one of the body
 *
 * Anthropic error types follow the status, as Anthropic's API uses them;
 * 503 and 529 are overloaded_error, other 5xx api_error (the SDKs retry
 * 5xx and 529 by status, whatever the type says).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "dialect.h"
#include "log.h"

const char *const token_kind_name[TOK_KINDS] = {"prompt", "completion", "prompt_cache_hit",
                                                "prompt_cache_miss", "prompt_cache_write"};

static bool
is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* PATH is PREFIX or below it ("/anthropic" and "/anthropic/..."). */
static bool
path_under(const char *path, const char *prefix)
{
    size_t n = strlen(prefix);

    return strncmp(path, prefix, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

/* The end of BODY without trailing white space, before E. */
static size_t
trim_end(const char *body, size_t s, size_t e)
{
    while (e > s && is_ws(body[e - 1])) {
        e--;
    }
    return e;
}

/* Does BODY[S..E) end with a line that is exactly "data: [DONE]"? */
static bool
ends_with_done(const char *body, size_t s, size_t e)
{
    static const char done[] = "data: [DONE]";
    size_t dl = sizeof(done) - 1;

    return e - s >= dl && memcmp(body + e - dl, done, dl) == 0 &&
           (e - s == dl || body[e - dl - 1] == '\n');
}

/* ---- usage ------------------------------------------------------------------ */

/*
 * The "usage" object in BUF (the first one, or the last one when LAST),
 * parsed; NULL when there is none whole.  A key "usage" inside a string
 * is escaped (\"usage\"), so the raw bytes "usage" are a key.
 */
static json_t *
usage_object(const char *buf, size_t len, bool last)
{
    const char *end = buf + len, *found = NULL;

    if (!buf || len < 8) {
        return NULL;
    }
    for (const char *p = buf; (p = memmem(p, (size_t)(end - p), "\"usage\"", 7)); p += 7) {
        const char *q = p + 7;
        while (q < end && is_ws(*q)) {
            q++;
        }
        if (q >= end || *q != ':') {
            continue;
        }
        q++;
        while (q < end && is_ws(*q)) {
            q++;
        }
        if (q >= end || *q != '{') {
            continue; /* "usage": null in a chunk before the last */
        }
        found = q;
        if (!last) {
            break;
        }
    }
    if (!found) {
        return NULL;
    }
    int depth = 0;
    bool str = false;
    const char *q = found;
    for (; q < end; q++) {
        if (str) {
            if (*q == '\\') {
                q++;
            } else if (*q == '"') {
                str = false;
            }
        } else if (*q == '"') {
            str = true;
        } else if (*q == '{') {
            depth++;
        } else if (*q == '}' && --depth == 0) {
            break;
        }
    }
    if (q >= end) {
        return NULL; /* cut by the buffer's edge */
    }
    json_t *o = json_loadb(found, (size_t)(q - found + 1), 0, NULL);
    if (o && !json_is_object(o)) {
        json_decref(o);
        o = NULL;
    }
    return o;
}

struct usage_field {
    const char *name;
    enum token_kind kind;
};

/* The fields of USAGE (top level, whole numbers) into TOKENS. */
static void
usage_take(json_t *usage, const struct usage_field *f, int64_t tokens[TOK_KINDS])
{
    for (; f->name; f++) {
        json_t *v = json_object_get(usage, f->name);
        if (json_is_integer(v) && json_integer_value(v) >= 0) {
            tokens[f->kind] = json_integer_value(v);
        }
    }
}

static const struct usage_field openai_fields[] = {
    {"prompt_tokens", TOK_PROMPT},
    {"completion_tokens", TOK_COMPLETION},
    {"prompt_cache_hit_tokens", TOK_CACHE_HIT},
    {"prompt_cache_miss_tokens", TOK_CACHE_MISS},
    {NULL, 0},
};

static const struct usage_field anthropic_fields[] = {
    {"input_tokens", TOK_PROMPT},
    {"output_tokens", TOK_COMPLETION},
    {"cache_read_input_tokens", TOK_CACHE_HIT},
    {"cache_creation_input_tokens", TOK_CACHE_WRITE},
    {NULL, 0},
};

static void
openai_usage(const char *head, size_t head_len, const char *tail, size_t tail_len, bool sse,
             int64_t tokens[TOK_KINDS])
{
    json_t *u = usage_object(tail, tail_len, true);

    (void)head;
    (void)head_len;
    (void)sse;
    usage_take(u, openai_fields, tokens);
    json_decref(u);
}

static void
anthropic_usage(const char *head, size_t head_len, const char *tail, size_t tail_len, bool sse,
                int64_t tokens[TOK_KINDS])
{
    if (sse) {
        /* message_start comes first: its message.usage has the input counts */
        json_t *start = usage_object(head, head_len, false);
        usage_take(start, anthropic_fields, tokens);
        json_decref(start);
    }
    /* the last one: message_delta's cumulative counts, or a whole answer's usage */
    json_t *u = usage_object(tail, tail_len, true);
    usage_take(u, anthropic_fields, tokens);
    json_decref(u);
}

/* ---- complete streams ------------------------------------------------------- */

static bool
openai_stream_complete(const char *body, size_t len)
{
    return ends_with_done(body, 0, trim_end(body, 0, len));
}

/* Is the line [P, E) the field NAME ("event", "data")?  *V gets its value. */
static bool
field_line(const char *p, const char *e, const char *name, const char **v)
{
    size_t n = strlen(name);

    if ((size_t)(e - p) < n + 1 || memcmp(p, name, n) != 0 || p[n] != ':') {
        return false;
    }
    p += n + 1;
    if (p < e && *p == ' ') {
        p++;
    }
    *v = p;
    return true;
}

/*
 * The last event is message_stop: a data line {"type":"message_stop"},
 * and no event line naming anything else; after it only a data: [DONE]
 * may come.
 */
static bool
anthropic_stream_complete(const char *body, size_t len)
{
    size_t e = trim_end(body, 0, len);

    if (ends_with_done(body, 0, e)) {
        e = trim_end(body, 0, e - (sizeof("data: [DONE]") - 1));
    }
    /* the last event starts after the last blank line before E */
    size_t s = 0;
    for (size_t i = e; i-- > 1;) {
        if (body[i] == '\n' &&
            (body[i - 1] == '\n' || (body[i - 1] == '\r' && i >= 2 && body[i - 2] == '\n'))) {
            s = i + 1;
            break;
        }
    }
    bool stop = false, other = false;
    for (const char *p = body + s, *end = body + e; p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end, *v;
        const char *ve = le > p && le[-1] == '\r' ? le - 1 : le;
        if (field_line(p, ve, "event", &v)) {
            other |= !((size_t)(ve - v) == 12 && memcmp(v, "message_stop", 12) == 0);
        } else if (field_line(p, ve, "data", &v)) {
            json_t *j = json_loadb(v, (size_t)(ve - v), 0, NULL);
            const char *t = json_string_value(json_object_get(j, "type"));
            stop |= t && strcmp(t, "message_stop") == 0;
            json_decref(j);
        }
        p = nl ? nl + 1 : end;
    }
    return stop && !other;
}

/* ---- errors ------------------------------------------------------------------ */

static void
openai_object(struct evbuffer *out, const struct dialect_error *e, bool with_status)
{
    evbuffer_add_printf(out, "{\"error\":{\"message\":\"");
    log_json_escape(out, e->message ? e->message : "");
    evbuffer_add_printf(out, "\",\"type\":\"");
    log_json_escape(out, e->type ? e->type : "upstream_error");
    evbuffer_add_printf(out, "\",\"code\":\"");
    log_json_escape(out, e->code ? e->code : "");
    if (with_status && e->status > 0) {
        evbuffer_add_printf(out, "\",\"status\":%d}}", e->status);
    } else {
        evbuffer_add_printf(out, "\"}}");
    }
}

static void
openai_error_body(struct evbuffer *out, const struct dialect_error *e)
{
    openai_object(out, e, false);
    evbuffer_add(out, "\n", 1);
}

static void
openai_sse_error(struct evbuffer *out, const struct dialect_error *e)
{
    evbuffer_add_printf(out, "event: error\ndata: ");
    openai_object(out, e, e->with_status);
    evbuffer_add_printf(out, "\n\n");
}

/* Anthropic's error type for an HTTP status. */
static const char *
anthropic_type(int status)
{
    switch (status) {
    case 401:
        return "authentication_error";
    case 403:
        return "permission_error";
    case 404:
        return "not_found_error";
    case 413:
        return "request_too_large";
    case 429:
        return "rate_limit_error";
    case 503:
    case 529:
        return "overloaded_error";
    default:
        return status >= 500 ? "api_error" : "invalid_request_error";
    }
}

static void
anthropic_object(struct evbuffer *out, const struct dialect_error *e)
{
    evbuffer_add_printf(out, "{\"type\":\"error\",\"error\":{\"type\":\"%s\",\"message\":\"",
                        anthropic_type(e->status));
    log_json_escape(out, e->message ? e->message : "");
    evbuffer_add_printf(out, "\"}}");
}

static void
anthropic_error_body(struct evbuffer *out, const struct dialect_error *e)
{
    anthropic_object(out, e);
    evbuffer_add(out, "\n", 1);
}

static void
anthropic_sse_error(struct evbuffer *out, const struct dialect_error *e)
{
    evbuffer_add_printf(out, "event: error\ndata: ");
    anthropic_object(out, e);
    evbuffer_add_printf(out, "\n\n");
}

/* ---- paths ------------------------------------------------------------------- */

static bool
anthropic_matches(const char *path)
{
    return path_under(path, "/anthropic") || path_under(path, "/v1/messages");
}

/* Everything that no other dialect takes. */
static bool
openai_matches(const char *path)
{
    return dialect_of_path(path) == &dialect_openai;
}

static bool
never(const char *path)
{
    (void)path;
    return false;
}

/* Token counting: no model runs, the answer comes at once. */
static bool
anthropic_cheap(const char *path)
{
    static const char tail[] = "/messages/count_tokens";
    size_t n = strlen(path), tl = sizeof(tail) - 1;

    return n >= tl && strcmp(path + n - tl, tail) == 0;
}

/* ---- the tables -------------------------------------------------------------- */

static const struct dialect_token openai_tokens[] = {{"Authorization", "Bearer "}, {NULL, NULL}};
/* Claude Code sends ANTHROPIC_API_KEY as x-api-key, ANTHROPIC_AUTH_TOKEN as a bearer token */
static const struct dialect_token anthropic_tokens[] = {
    {"x-api-key", ""}, {"Authorization", "Bearer "}, {NULL, NULL}};

static const int openai_busy[] = {0};
static const int anthropic_busy[] = {529, 0};

const struct dialect dialect_openai = {
    .id = DIALECT_OPENAI,
    .name = "openai",
    .title = "OpenAI",
    .matches = openai_matches,
    .cheap = never,
    .stream_complete = openai_stream_complete,
    .usage = openai_usage,
    .error_body = openai_error_body,
    .sse_error = openai_sse_error,
    .sse_keepalive = ": keep-alive\n\n",
    .tokens = openai_tokens,
    .busy = openai_busy,
};

const struct dialect dialect_anthropic = {
    .id = DIALECT_ANTHROPIC,
    .name = "anthropic",
    .title = "Anthropic",
    .matches = anthropic_matches,
    .cheap = anthropic_cheap,
    .stream_complete = anthropic_stream_complete,
    .usage = anthropic_usage,
    .error_body = anthropic_error_body,
    .sse_error = anthropic_sse_error,
    .sse_keepalive = "event: ping\ndata: {\"type\": \"ping\"}\n\n",
    .tokens = anthropic_tokens,
    .busy = anthropic_busy,
};

static const struct dialect *const dialects[DIALECTS] = {
    [DIALECT_OPENAI] = &dialect_openai,
    [DIALECT_ANTHROPIC] = &dialect_anthropic,
};

const struct dialect *
dialect_of_path(const char *path)
{
    for (int i = 0; path && i < DIALECTS; i++) {
        if (i != DIALECT_OPENAI && dialects[i]->matches(path)) {
            return dialects[i];
        }
    }
    return &dialect_openai;
}

const struct dialect *
dialect_by_id(enum dialect_id id)
{
    return (unsigned)id < DIALECTS ? dialects[id] : &dialect_openai;
}

int
dialect_by_name(const char *name)
{
    for (int i = 0; i < DIALECTS; i++) {
        if (strcasecmp(name, dialects[i]->name) == 0) {
            return i;
        }
    }
    return -1;
}

bool
dialect_busy(const struct dialect *d, int status)
{
    for (const int *b = d->busy; *b; b++) {
        if (*b == status) {
            return true;
        }
    }
    return false;
}

bool
dialect_stream_complete_any(const char *body, size_t len)
{
    for (int i = 0; i < DIALECTS; i++) {
        if (dialects[i]->stream_complete(body, len)) {
            return true;
        }
    }
    return false;
}
