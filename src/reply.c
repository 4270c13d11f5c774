/*
 * reply: the X-Cache and X-Dsgate-* headers of an answer, and the answers
 * dsgate makes itself.
 */
#include <stdio.h>

#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "access.h"
#include "cache.h"
#include "gateway.h"
#include "http.h"
#include "metrics.h"
#include "reply.h"
#include "request.h"

size_t
reply_headers(struct http_header *h, const struct reply_info *ri, struct reply_buf *b)
{
    size_t n = 0;

    snprintf(b->attempts, sizeof(b->attempts), "%d", ri->attempts);
    snprintf(b->queue_ms, sizeof(b->queue_ms), "%lld", (long long)ri->queue_ms);
    if (ri->cache) {
        h[n++] = (struct http_header){"X-Cache", ri->cache};
    }
    if (ri->coalesced) {
        h[n++] = (struct http_header){"X-Dsgate-Coalesced", "1"};
    }
    h[n++] = (struct http_header){"X-Dsgate-Attempts", b->attempts};
    h[n++] = (struct http_header){"X-Dsgate-Queue-Ms", b->queue_ms};
    if (ri->upstream) {
        h[n++] = (struct http_header){"X-Dsgate-Upstream", ri->upstream};
    }
    if (ri->client) {
        h[n++] = (struct http_header){"X-Dsgate-Client", ri->client};
    }
    return n;
}

static void
reply_error(struct request *r, int status, const char *type, const char *code, const char *message)
{
    struct http_header h[REPLY_MAX_HEADERS];
    struct reply_buf rb;
    struct reply_info ri = {
        .attempts = r->attempts,
        .queue_ms = r->queue_us / 1000,
        .upstream = r->attempts > 0 && r->att->up ? r->att->up->conf->name : NULL,
        .client = REPLY_CLIENT(r),
    };
    size_t nh = reply_headers(h, &ri, &rb);

    r->status = status;
    http_reply_error_h(r->hreq, status, type, code, message, h, nh);
    r->hreq = NULL;
}

/* An SSE error event in the request's dialect (STATUS > 0: the OpenAI event says it). */
static void
send_sse_error(struct request *r, int status, int type_status, const char *type, const char *code,
               const char *message)
{
    struct dialect_error e = {
        .status = status > 0 ? status : type_status,
        .with_status = status > 0,
        .type = type,
        .code = code,
        .message = message,
    };
    /* close any half-sent line or event first, so the error stands alone */
    const char *sep = r->scan.mid_line ? "\n\n" : (r->scan.mid_event ? "\n" : "");
    struct evbuffer *b = evbuffer_new();

    if (b) {
        evbuffer_add(b, sep, strlen(sep));
        r->dialect->sse_error(b, &e);
        size_t n = evbuffer_get_length(b);
        http_reply_data(r->hreq, evbuffer_pullup(b, -1), n);
        evbuffer_free(b);
    }
}

/*
 * After dsgate's own 200 head, before any data: the error is the body, an
 * error object of the request's dialect that any JSON client can read.
 */
static void
send_json_error(struct request *r, int status, const char *type, const char *code,
                const char *message)
{
    struct dialect_error e = {.status = status, .type = type, .code = code, .message = message};
    struct evbuffer *b = evbuffer_new();

    if (b) {
        r->dialect->error_body(b, &e);
        size_t n = evbuffer_get_length(b);
        http_reply_data(r->hreq, evbuffer_pullup(b, -1), n);
        evbuffer_free(b);
    }
    http_reply_end(r->hreq, false);
    r->hreq = NULL;
}

void
reply_early_head(struct request *r)
{
    struct http_header h[1 + REPLY_MAX_HEADERS];
    struct reply_buf rb;
    int64_t queued_us = r->item.queued ? http_now_us() - r->item.t_in_us : 0; /* waiting now */
    struct reply_info ri = {
        .attempts = r->attempts,
        .queue_ms = (r->queue_us + queued_us) / 1000,
        .upstream = r->attempts > 0 && r->att->up ? r->att->up->conf->name : NULL,
        .cache = r->cacheable ? (r->store_ok ? "MISS" : "BYPASS") : NULL,
        .client = REPLY_CLIENT(r),
    };

    h[0] = (struct http_header){"Content-Type", r->want_sse ? "text/event-stream; charset=utf-8"
                                                            : "application/json"};
    size_t nh = 1 + reply_headers(h + 1, &ri, &rb);
    r->replied = r->early = true;
    r->sse = r->want_sse;
    r->status = 200;
    sse_scan_init(&r->scan, r->sse);
    http_reply_start(r->hreq, 200, h, nh, -1);
}

void
reply_late_error(struct request *r, int status, const char *body, size_t len)
{
    char msg[512], type[64] = "upstream_error", code[16];
    json_t *j = body && len ? json_loadb(body, len, 0, NULL) : NULL;
    json_t *e = json_object_get(j, "error");
    const char *m = json_string_value(json_object_get(e, "message"));
    const char *t = json_string_value(json_object_get(e, "type"));

    if (m) {
        snprintf(msg, sizeof(msg), "%s", m);
    } else {
        snprintf(msg, sizeof(msg), "upstream answered %d after the stream had started", status);
    }
    if (t) {
        snprintf(type, sizeof(type), "%s", t);
    }
    json_decref(j);
    snprintf(code, sizeof(code), "%d", status);
    r->end = END_UP_ERROR;
    r->status = status; /* the true status, for the log and the metrics */
    if (!r->hreq) {
        return;
    }
    if (!http_reply_started(r->hreq)) {
        reply_error(r, 502, "upstream_error", "upstream_error", msg);
        r->status = status;
    } else if (r->sse) {
        send_sse_error(r, status, status, type, code, msg);
        http_reply_end(r->hreq, false);
        r->hreq = NULL;
    } else if (r->early && !r->data_sent) {
        send_json_error(r, status, type, code, msg);
    } else {
        http_reply_end(r->hreq, true);
        r->hreq = NULL;
    }
}

void
reply_fail(struct request *r, int status, const char *code, const char *message, enum req_end end)
{
    const char *type = status == 429 ? "rate_limit_error" : "upstream_error";

    r->end = end;
    if (r->early && !r->data_sent) {
        r->status = status; /* the true status, for the log and the metrics */
    }
    if (!r->hreq) {
        return;
    }
    if (!http_reply_started(r->hreq)) {
        reply_error(r, status, type, code, message);
    } else if (r->sse) {
        send_sse_error(r, r->early && !r->data_sent ? status : 0, status, type, code, message);
        http_reply_end(r->hreq, false);
        r->hreq = NULL;
    } else if (r->early && !r->data_sent) {
        send_json_error(r, status, type, code, message);
    } else {
        http_reply_end(r->hreq, true); /* an incomplete body must not look complete */
        r->hreq = NULL;
    }
}

static void
entry_release(void *arg)
{
    cache_entry_unref(arg);
}

void
reply_cached(struct request *r, struct cache_entry *e, const char *tier)
{
    struct http_header h[1 + REPLY_MAX_HEADERS];
    struct reply_buf rb;
    struct reply_info ri = {.cache = "HIT", .client = REPLY_CLIENT(r)};

    h[0] = (struct http_header){"Content-Type", e->ctype};
    size_t nh = 1 + reply_headers(h + 1, &ri, &rb);
    r->status = 200;
    r->cache_status = CS_HIT;
    r->end = END_CACHE_HIT;
    metrics_addf("dsgate_cache_hits_total", 1, "tier=\"%s\"", tier);
    if (!r->hreq) {
        cache_entry_unref(e);
        return;
    }
    r->bytes_out = e->body_len;
    if (!r->replied) {
        http_reply_start(r->hreq, 200, h, nh, (int64_t)e->body_len);
    }
    http_reply_data_ref(r->hreq, e->body, e->body_len, entry_release, e);
    http_reply_end(r->hreq, false);
    r->hreq = NULL;
}

void
reply_auth(struct request *r, struct gw_upstream *u)
{
    struct http_header h[1 + REPLY_MAX_HEADERS];
    struct reply_buf rb;
    struct reply_info ri = {.upstream = u->conf->name};

    h[0] = (struct http_header){"Content-Type", "application/json"};
    size_t nh = 1 + reply_headers(h + 1, &ri, &rb);
    if (r->replied) {
        reply_late_error(r, u->auth_status, u->auth_body, u->auth_body_len);
    } else if (r->hreq) {
        http_reply(r->hreq, u->auth_status, h, nh, u->auth_body, u->auth_body_len);
        r->hreq = NULL;
    }
    r->status = u->auth_status;
    r->end = END_CIRCUIT_OPEN;
}

void
reply_unknown_model(struct request *r)
{
    struct evbuffer *b = evbuffer_new();
    const char *list = "";

    if (b) {
        for (size_t i = 0; i < r->gw->nups; i++) {
            const struct conf_upstream *u = r->gw->ups[i]->conf;
            for (size_t j = 0; j < u->nmodels; j++) {
                evbuffer_add_printf(b, "%s%s", evbuffer_get_length(b) ? ", " : "",
                                    u->models[j].from);
            }
        }
        evbuffer_add(b, "", 1);
        list = (const char *)evbuffer_pullup(b, -1);
    }
    char msg[1024];
    snprintf(msg, sizeof(msg), "The model `%s` does not exist; available models: %s", r->model,
             list);
    if (r->replied) {
        reply_fail(r, 404, "model_not_found", msg, END_UNKNOWN_MODEL);
    } else {
        http_reply_error(r->hreq, 404, "invalid_request_error", "model_not_found", msg);
        r->hreq = NULL;
    }
    r->status = 404;
    r->end = END_UNKNOWN_MODEL;
    if (b) {
        evbuffer_free(b);
    }
}

void
reply_no_dialect(struct request *r)
{
    char msg[256];

    snprintf(msg, sizeof(msg),
             "no configured upstream takes %s requests (upstreams[].dialects); %s is not served",
             r->dialect->title, r->path);
    if (r->replied) {
        reply_fail(r, 404, "dialect_not_served", msg, END_NO_DIALECT);
    } else {
        http_reply_error(r->hreq, 404, "invalid_request_error", "dialect_not_served", msg);
        r->hreq = NULL;
    }
    r->status = 404;
    r->end = END_NO_DIALECT;
}

void
reply_unreachable(struct request *r, int64_t retry_ms)
{
    struct http_header h[1 + REPLY_MAX_HEADERS];
    struct reply_buf rb;
    struct reply_info ri = {
        .attempts = r->attempts, .queue_ms = r->queue_us / 1000, .client = REPLY_CLIENT(r)};
    char ra[24];

    long long secs = (retry_ms + 999) / 1000;
    snprintf(ra, sizeof(ra), "%lld", secs < 1 ? 1 : secs);
    h[0] = (struct http_header){"Retry-After", ra};
    size_t nh = 1 + reply_headers(h + 1, &ri, &rb);
    r->status = 503;
    r->end = END_UP_UNREACHABLE;
    if (r->hreq && !http_reply_started(r->hreq)) {
        http_reply_error_h(r->hreq, 503, "upstream_error", "upstream_unreachable",
                           "no upstream can be reached now; retry later", h, nh);
        r->hreq = NULL;
    } else {
        reply_fail(r, 503, "upstream_unreachable", "no upstream can be reached now; retry later",
                   END_UP_UNREACHABLE);
    }
}

/* OpenAI's reset format: "250ms", "1.5s", "6m0s". */
static void
fmt_reset(char *out, size_t n, int64_t us)
{
    int64_t ms = (us + 999) / 1000;

    if (ms < 1000) {
        snprintf(out, n, "%lldms", (long long)ms);
    } else if (ms < 60000) {
        snprintf(out, n, "%lld.%llds", (long long)(ms / 1000), (long long)(ms % 1000 / 100));
    } else {
        snprintf(out, n, "%lldm%llds", (long long)(ms / 60000), (long long)(ms % 60000 / 1000));
    }
}

void
reply_client_limited(struct request *r, int why, int64_t wait_us)
{
    struct gw_client *cl = r->client;
    struct http_header h[8 + REPLY_MAX_HEADERS];
    struct reply_buf rb;
    struct reply_info ri = {.queue_ms = r->queue_us / 1000, .client = REPLY_CLIENT(r)};
    char ra[24], ram[24], lr[24], rr[24], sr[24], lt[24], rt[24], st[24], msg[256];
    int64_t now = http_now_us();
    size_t nh = 0;
    const char *code = "rate_limit_exceeded";

    if (wait_us < 0) {
        wait_us = 1000000; /* until one of its transfers ends: no better guess than a second */
    }
    snprintf(ra, sizeof(ra), "%lld", (long long)((wait_us + 999999) / 1000000));
    snprintf(ram, sizeof(ram), "%lld", (long long)((wait_us + 999) / 1000));
    h[nh++] = (struct http_header){"Retry-After", ra};
    h[nh++] = (struct http_header){"retry-after-ms", ram};
    if (cl->rpm > 0) {
        bucket_refill(&cl->req, now);
        snprintf(lr, sizeof(lr), "%lld", (long long)cl->rpm);
        snprintf(rr, sizeof(rr), "%lld", (long long)(cl->req.level > 0 ? cl->req.level : 0));
        fmt_reset(sr, sizeof(sr), bucket_reset_us(&cl->req, now));
        h[nh++] = (struct http_header){"x-ratelimit-limit-requests", lr};
        h[nh++] = (struct http_header){"x-ratelimit-remaining-requests", rr};
        h[nh++] = (struct http_header){"x-ratelimit-reset-requests", sr};
    }
    if (cl->tpm > 0) {
        bucket_refill(&cl->tok, now);
        snprintf(lt, sizeof(lt), "%lld", (long long)cl->tpm);
        snprintf(rt, sizeof(rt), "%lld", (long long)(cl->tok.level > 0 ? cl->tok.level : 0));
        fmt_reset(st, sizeof(st), bucket_reset_us(&cl->tok, now));
        h[nh++] = (struct http_header){"x-ratelimit-limit-tokens", lt};
        h[nh++] = (struct http_header){"x-ratelimit-remaining-tokens", rt};
        h[nh++] = (struct http_header){"x-ratelimit-reset-tokens", st};
    }
    nh += reply_headers(h + nh, &ri, &rb);
    switch ((enum client_reason)why) {
    case CLIENT_DAY:
        code = "daily_budget_exceeded";
        snprintf(msg, sizeof(msg),
                 "client %s has spent its daily budget of %lld tokens; it renews at 00:00 UTC",
                 cl->name, (long long)cl->tokens_per_day);
        break;
    case CLIENT_MAX_INFLIGHT:
        code = "concurrency_limit_exceeded";
        snprintf(msg, sizeof(msg), "client %s has %d requests in flight, its max_inflight",
                 cl->name, cl->max_inflight);
        break;
    case CLIENT_TPM:
        snprintf(msg, sizeof(msg),
                 "client %s is over its limit of %lld tokens per minute (this request may use "
                 "%lld); retry in %s s", cl->name, (long long)cl->tpm, (long long)r->est, ra);
        break;
    default:
        snprintf(msg, sizeof(msg), "client %s is over its limit of %lld requests per minute; "
                 "retry in %s s", cl->name, (long long)cl->rpm, ra);
        break;
    }
    r->status = 429;
    r->end = END_CLIENT_LIMITED;
    if (r->hreq && !http_reply_started(r->hreq)) {
        http_reply_error_h(r->hreq, 429, "rate_limit_error", code, msg, h, nh);
        r->hreq = NULL;
    } else {
        reply_fail(r, 429, code, msg, END_CLIENT_LIMITED);
    }
}
