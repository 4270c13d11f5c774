/*
 * server: the front door.  Every request from http.c comes here first:
 * dsgate's own endpoints are answered, requests are checked (priority,
 * JSON on the completion endpoints) and admitted, and the rest goes to
 * request.c to be proxied.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>

#include "access.h"
#include "dialect.h"
#include "dispatch.h"
#include "gateway.h"
#include "http.h"
#include "jscan.h"
#include "log.h"
#include "lookup.h"
#include "metrics.h"
#include "models.h"
#include "request.h"
#include "server.h"

static const struct http_header json_ct[] = {{"Content-Type", "application/json"}};

/*
 * Bodies up to this size are keyed in canonical form (parsed with jansson);
 * larger ones by their exact bytes, so that parsing megabytes never holds
 * the event loop (a dense 1 MiB body takes jansson about a second under
 * ASan).  They are still checked by jscan.
 */
#define CACHE_PARSE_MAX (64 * 1024)

static bool
path_is(const struct conf *c, const char *path)
{
    for (size_t i = 0; i < c->cache.npaths; i++) {
        if (strcmp(c->cache.paths[i], path) == 0) {
            return true;
        }
    }
    return false;
}

static void
reply_readyz(struct gateway *gw, struct http_req *req)
{
    struct evbuffer *b = evbuffer_new();
    int64_t now = http_now_us();
    bool ready = false;

    for (size_t i = 0; i < gw->nups; i++) {
        ready |= circuit_usable(&gw->ups[i]->circuit, now);
    }
    ready = ready && !gw->draining;

    if (!b) {
        http_reply_error(req, 500, "internal_error", "out_of_memory", "out of memory");
        return;
    }
    evbuffer_add_printf(b, "{\"ready\":%s,\"upstreams\":[", ready ? "true" : "false");
    for (size_t i = 0; i < gw->nups; i++) {
        const struct gw_upstream *u = gw->ups[i];
        evbuffer_add_printf(b, "%s{\"name\":\"", i ? "," : "");
        log_json_escape(b, u->conf->name);
        evbuffer_add_printf(b,
                            "\",\"state\":\"%s\",\"reason\":\"%s\",\"inflight\":%d,"
                            "\"limit\":%d,\"first_data_baseline_ms\":%lld,"
                            "\"first_data_sample_ms\":%lld}",
                            circuit_state_name(u->circuit.state), u->circuit.reason,
                            u->limit.inflight, sched_limit_current(&u->limit),
                            (long long)(u->limit.baseline_us / 1000),
                            (long long)(u->limit.sample_us / 1000));
    }
    evbuffer_add_printf(b, "]}\n");
    size_t len = evbuffer_get_length(b);
    http_reply(req, ready ? 200 : 503, json_ct, 1, evbuffer_pullup(b, -1), len);
    evbuffer_free(b);
}

static void
reply_metrics(struct gateway *gw, struct http_req *req)
{
    static const struct http_header ct[] = {
        {"Content-Type", "text/plain; version=0.0.4; charset=utf-8"}};
    struct evbuffer *b = evbuffer_new();

    if (!b) {
        http_reply_error(req, 500, "internal_error", "out_of_memory", "out of memory");
        return;
    }
    dispatch_update_gauges(gw);
    metrics_render(b);
    size_t len = evbuffer_get_length(b);
    http_reply(req, 200, ct, 1, evbuffer_pullup(b, -1), len);
    evbuffer_free(b);
}

/*
 * The request's client (clients.h).  With tokens configured, the request
 * must carry one where its dialect puts a key (OpenAI: Authorization:
 * Bearer TOKEN; Anthropic: x-api-key: TOKEN too, as Claude Code sends
 * ANTHROPIC_API_KEY); NULL when it does not.  Without, X-Dsgate-Client
 * names it, else it is the default client.
 */
static struct gw_client *
client_find(const struct gateway *gw, const struct http_req *req)
{
    const struct clients *cs = &gw->clients;

    if (!cs->require_token) {
        const char *hint = http_req_header(req, "X-Dsgate-Client");
        struct gw_client *cl = hint ? clients_by_name(cs, hint) : NULL;
        return cl ? cl : cs->deflt;
    }
    for (const struct dialect_token *t = dialect_of_path(req->path)->tokens; t->header; t++) {
        const char *v = http_req_header(req, t->header);
        size_t sl = strlen(t->scheme);
        if (!v || strncasecmp(v, t->scheme, sl) != 0) {
            continue;
        }
        struct gw_client *cl = clients_by_token(cs, v + sl, strlen(v + sl));
        if (cl) {
            return cl;
        }
    }
    return NULL;
}

/* GET /clients: each client's limits and where it stands now. */
static void
reply_clients(struct gateway *gw, struct http_req *req)
{
    static const struct http_header ct[] = {{"Content-Type", "application/json"}};
    struct evbuffer *b = evbuffer_new();
    int64_t now = http_now_us();

    if (!b) {
        http_reply_error(req, 500, "internal_error", "out_of_memory", "out of memory");
        return;
    }
    evbuffer_add_printf(b, "{\"clients\":[");
    for (size_t i = 0; i < gw->clients.n; i++) {
        struct gw_client *cl = gw->clients.v[i];
        evbuffer_add_printf(b,
                            "%s{\"name\":\"%s\",\"priority\":\"%s\",\"weight\":%d,"
                            "\"max_inflight\":%d,\"rpm\":%lld,\"tpm\":%lld,"
                            "\"tokens_per_day\":%lld,\"over_limit\":\"%s\",\"inflight\":%d,"
                            "\"queued\":%zu,",
                            i ? "," : "", cl->name, conf_priority_name(cl->priority), cl->weight,
                            cl->max_inflight, (long long)cl->rpm, (long long)cl->tpm,
                            (long long)cl->tokens_per_day, cl->reject ? "reject" : "queue",
                            cl->inflight, cl->queued);
        if (cl->rpm > 0) {
            bucket_refill(&cl->req, now);
            evbuffer_add_printf(b, "\"requests_available\":%.2f,", cl->req.level);
        } else {
            evbuffer_add_printf(b, "\"requests_available\":null,");
        }
        if (cl->tpm > 0) {
            bucket_refill(&cl->tok, now);
            evbuffer_add_printf(b, "\"tokens_available\":%.0f,", cl->tok.level);
        } else {
            evbuffer_add_printf(b, "\"tokens_available\":null,");
        }
        evbuffer_add_printf(b, "\"tokens_reserved\":%lld,\"tokens_today\":%lld,",
                            (long long)cl->reserved, (long long)cl->tokens_today);
        if (cl->tokens_per_day > 0) {
            int64_t left = cl->tokens_per_day - cl->tokens_today - cl->reserved;
            evbuffer_add_printf(b, "\"budget_remaining\":%lld}", (long long)(left > 0 ? left : 0));
        } else {
            evbuffer_add_printf(b, "\"budget_remaining\":null}");
        }
    }
    evbuffer_add_printf(b, "]}\n");
    size_t len = evbuffer_get_length(b);
    http_reply(req, 200, ct, 1, evbuffer_pullup(b, -1), len);
    evbuffer_free(b);
}

/* /healthz, /readyz, /metrics, /clients; false when REQ is not for them. */
static bool
own_endpoint(struct gateway *gw, struct http_req *req)
{
    if (strcmp(req->method, "GET") != 0 && strcmp(req->method, "HEAD") != 0) {
        return false;
    }
    if (strcmp(req->path, "/healthz") == 0) {
        static const char ok[] = "{\"status\":\"ok\"}\n";
        http_reply(req, 200, json_ct, 1, ok, sizeof(ok) - 1);
        return true;
    }
    if (strcmp(req->path, "/readyz") == 0) {
        reply_readyz(gw, req);
        return true;
    }
    if (strcmp(req->path, "/metrics") == 0) {
        reply_metrics(gw, req);
        return true;
    }
    if (strcmp(req->path, "/clients") == 0) {
        reply_clients(gw, req);
        return true;
    }
    return false;
}

void
server_error_body(const struct http_req *req, int status, const char *type, const char *code,
                  const char *message, struct evbuffer *out)
{
    struct dialect_error e = {.status = status, .type = type, .code = code, .message = message};

    dialect_of_path(req->path)->error_body(out, &e);
}

/* A request answered without being proxied: its access-log line and its count. */
static void
note_refused(const struct http_req *req, enum prio prio, int status, const char *code)
{
    struct access_rec a = {
        .id = req->id,
        .method = req->method ? req->method : "-",
        .path = req->path ? req->path : "-",
        .status = status,
        .prio = prio,
        .cache = CS_NONE,
        .upstream = "",
        .first_data_ms = -1,
        .t_start_us = req->t_start_us ? req->t_start_us : http_now_us(),
        .bytes_in = req->body_len,
        .end = END_REFUSED,
        .code = code,
    };
    access_note(&a);
}

/* Refuse REQ with an error in its dialect, logged and counted like any request. */
static void
reject(struct http_req *req, enum prio prio, int status, const char *type, const char *code,
       const char *msg)
{
    note_refused(req, prio, status, code);
    http_reply_error(req, status, type, code, msg);
}

void
server_on_http_reject(const struct http_req *req, int status, const char *code, void *arg)
{
    const struct gateway *gw = arg;

    note_refused(req, gw->conf->queue.default_priority, status, code);
}

void
server_handle_admin(struct http_req *req, void *arg)
{
    if (!own_endpoint(arg, req)) {
        http_reply_error(req, 404, "invalid_request_error", "not_found",
                         "the admin address serves /metrics, /healthz, /readyz and /clients only");
    }
}

void
server_handle(struct http_req *req, void *arg)
{
    struct gateway *gw = arg;
    const struct conf *c = gw->conf;
    enum prio prio = c->queue.default_priority;

    if (own_endpoint(gw, req)) {
        return;
    }
    if (gw->draining) {
        reject(req, prio, 503, "server_busy", "shutting_down", "dsgate is shutting down");
        return;
    }
    /*
     * Priority: X-Priority, else the client's class, else the default.  A
     * client's class is also its ceiling: a header cannot raise it.
     */
    enum prio ceiling = PRIO_HIGH;
    struct gw_client *cl = client_find(gw, req);
    if (gw->clients.require_token && !cl) {
        reject(req, prio, 401, "authentication_error", "invalid_client_token",
               "missing or unknown client token");
        return;
    }
    if (cl) {
        prio = cl->priority;
        if (gw->clients.require_token) {
            ceiling = prio; /* a hint proves nothing: only a token's class is a ceiling */
        }
    }
    const char *pv = http_req_header(req, "X-Priority");
    if (pv) {
        if (conf_parse_priority(pv, &prio) < 0) {
            reject(req, c->queue.default_priority, 400, "invalid_request_error", "invalid_priority",
                   "X-Priority must be high, medium or low");
            return;
        }
        if (prio < ceiling) {
            prio = ceiling;
        }
    }
    if (models_wanted(gw, req)) {
        models_handle(gw, req);
        return;
    }
    /*
     * Bodies are checked on the JSON endpoints (cache.paths: invalid JSON is
     * a 400) and, when upstreams route by model, on any JSON POST
     * (leniently).  Other requests pass through unparsed.  The top-level
     * "model" that routing and renaming use comes from the same pass as the
     * check (jscan): what the check accepts is what routing reads, and no
     * tree is built for it, however large the body.  A jansson tree is
     * built for the canonical cache key only (bodies up to CACHE_PARSE_MAX).
     */
    json_t *doc = NULL;
    bool cache_path = strcmp(req->method, "POST") == 0 && path_is(c, req->path);
    bool no_store = false, no_cache = false;
    lookup_directives(req, &no_store, &no_cache);
    bool want_key = c->cache.enabled && !no_store;
    bool canonical = want_key && req->body_len <= CACHE_PARSE_MAX;
    bool need_model = gw->has_aliases;
    struct jscan_member mm = {0};
    uint8_t key[32], raw[32];
    bool raw_ok = false;
    bool known = cache_path && canonical && !need_model &&
                 lookup_known_key(gw, req, key, raw, &raw_ok);
    bool scanned = false;
    if (cache_path && !known) {
        const char *what;
        size_t at;
        if (jscan_object_member(req->body, req->body_len, "model", need_model ? &mm : NULL, &what,
                                &at) < 0) {
            char msg[256];
            snprintf(msg, sizeof(msg), "request body is not a valid JSON object: %s at byte %zu",
                     what, at);
            reject(req, prio, 400, "invalid_request_error", "invalid_json", msg);
            return;
        }
        scanned = need_model;
        if (canonical) {
            doc = json_loadb(req->body, req->body_len, JSON_ALLOW_NUL, NULL);
            if (doc && !json_is_object(doc)) {
                json_decref(doc);
                doc = NULL;
            }
            if (!doc) {
                /* valid JSON jansson cannot hold (a lone surrogate): keyed by its exact bytes */
                if (raw_ok) {
                    memcpy(key, raw, sizeof(key));
                }
                known = raw_ok || lookup_raw_key(gw, req, key) == 0;
            }
        } else if (want_key) {
            known = lookup_raw_key(gw, req, key) == 0; /* keyed by its exact bytes */
        }
    } else if (need_model && req->body_len > 0 && strcmp(req->method, "POST") == 0) {
        const char *ct = http_req_header(req, "Content-Type");
        const char *what;
        size_t at;
        scanned = ct && strncasecmp(ct, "application/json", 16) == 0 &&
                  jscan_object_member(req->body, req->body_len, "model", &mm, &what, &at) == 0;
    }
    char model[256];
    struct request_body_info bi = {
        .doc = doc,
        .known_key = known ? key : NULL,
        .raw_key = raw_ok && !known ? raw : NULL,
        .client = cl,
    };
    if (scanned && mm.count > 1) {
        reject(req, prio, 400, "invalid_request_error", "invalid_model",
               "\"model\" appears more than once");
        json_decref(doc);
        return;
    }
    if (scanned && mm.count == 1) {
        if (!mm.is_string ||
            jscan_string_decode(req->body + mm.off, mm.len, model, sizeof(model)) < 0) {
            reject(req, prio, 400, "invalid_request_error", "invalid_model",
                   "\"model\" must be a string of at most 255 bytes without NUL or lone "
                   "surrogates");
            json_decref(doc);
            return;
        }
        bi.model = model;
        bi.model_off = mm.off;
        bi.model_len = mm.len;
    }
    request_start(gw, req, prio, cache_path, &bi);
    json_decref(doc);
}
