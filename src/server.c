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
#include <jansson.h>

#include "gateway.h"
#include "http.h"
#include "log.h"

static const struct http_header json_ct[] = { { "Content-Type", "application/json" } };

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
    bool ready = !gw->draining && gw->nups > 0;

    if (!b) {
        http_reply_error(req, 500, "internal_error", "out_of_memory", "out of memory");
        return;
    }
    evbuffer_add_printf(b, "{\"ready\":%s,\"upstreams\":[", ready ? "true" : "false");
    for (size_t i = 0; i < gw->nups; i++) {
        const struct gw_upstream *u = &gw->ups[i];
        evbuffer_add_printf(b, "%s{\"name\":\"", i ? "," : "");
        log_json_escape(b, u->conf->name);
        evbuffer_add_printf(b, "\",\"state\":\"closed\",\"reason\":\"\",\"inflight\":%d,\"limit\":%d}",
                            u->inflight, u->conf->max_inflight);
    }
    evbuffer_add_printf(b, "]}\n");
    size_t len = evbuffer_get_length(b);
    http_reply(req, ready ? 200 : 503, json_ct, 1, evbuffer_pullup(b, -1), len);
    evbuffer_free(b);
}

void
server_handle(struct http_req *req, void *arg)
{
    struct gateway *gw = arg;
    const struct conf *c = gw->conf;
    enum prio prio = c->queue.default_priority;

    if (strcmp(req->method, "GET") == 0 || strcmp(req->method, "HEAD") == 0) {
        if (strcmp(req->path, "/healthz") == 0) {
            static const char ok[] = "{\"status\":\"ok\"}\n";
            http_reply(req, 200, json_ct, 1, ok, sizeof(ok) - 1);
            return;
        }
        if (strcmp(req->path, "/readyz") == 0) {
            reply_readyz(gw, req);
            return;
        }
    }
    if (gw->draining) {
        http_reply_error(req, 503, "server_busy", "shutting_down", "dsgate is shutting down");
        return;
    }
    const char *pv = http_req_header(req, "X-Priority");
    if (pv && conf_parse_priority(pv, &prio) < 0) {
        http_reply_error(req, 400, "invalid_request_error", "invalid_priority",
                         "X-Priority must be high, medium or low");
        return;
    }
    if (strcmp(req->method, "POST") == 0 && path_is(c, req->path)) {
        json_error_t jerr;
        json_t *doc = json_loadb(req->body, req->body_len, JSON_REJECT_DUPLICATES, &jerr);
        if (!doc || !json_is_object(doc)) {
            char msg[256];
            snprintf(msg, sizeof(msg), "request body is not a valid JSON object%s%s",
                     doc ? "" : ": ", doc ? "" : jerr.text);
            json_decref(doc);
            http_reply_error(req, 400, "invalid_request_error", "invalid_json", msg);
            return;
        }
        json_decref(doc);
    }
    request_start(gw, req, prio);
}

int
gateway_setup_upstreams(struct gateway *gw)
{
    const struct conf *c = gw->conf;
    struct gw_upstream *ups = calloc(c->nupstreams, sizeof(*ups));

    if (!ups) {
        return -1;
    }
    for (size_t i = 0; i < c->nupstreams; i++) {
        const struct conf_upstream *uc = &c->upstreams[i];
        ups[i].conf = uc;
        const char *key = uc->api_key_env[0] ? getenv(uc->api_key_env) : NULL;
        if (key && *key) {
            size_t n = strlen(key) + 32;
            ups[i].auth_header = malloc(n);
            if (!ups[i].auth_header) {
                free(ups);
                return -1;
            }
            snprintf(ups[i].auth_header, n, "Authorization: Bearer %s", key);
        }
    }
    gw->ups = ups;
    gw->nups = c->nupstreams;
    return 0;
}

void
gateway_free_upstreams(struct gateway *gw)
{
    for (size_t i = 0; i < gw->nups; i++) {
        free(gw->ups[i].auth_header);
    }
    free(gw->ups);
    gw->ups = NULL;
    gw->nups = 0;
}
