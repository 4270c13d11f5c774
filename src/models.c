/*
 * models: GET /v1/models (and /models) when more than one upstream or a
 * model alias is configured.  The answer is the union of the configured
 * aliases and the lists of the upstreams that take any model, fetched in
 * parallel and kept for MODELS_TTL_MS.  With one plain upstream the
 * request is proxied like any other, so its answer reaches the client
 * unchanged.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "gateway.h"
#include "http.h"
#include "log.h"
#include "models.h"
#include "upstream.h"

#define MODELS_TTL_MS   60000
#define MODELS_RETRY_MS 5000
#define MODELS_TIMEOUT  10000
#define MODELS_MAX_BODY (1024 * 1024)

struct models_part {
    struct models_fetch *mf;
    struct gw_upstream *up;
    struct up_xfer *x;
    struct evbuffer *body;
    int status;
    const char *hdrs[4];
    char *auth;
    char *url;
};

struct models_fetch {
    struct gateway *gw;
    struct http_req *req;
    size_t pending;
    struct models_part parts[ROUTE_MAX_UPSTREAMS];
    size_t nparts;
};

static char *models_cache; /* serialised answer */
static int64_t models_cache_until_us;

bool
models_wanted(const struct gateway *gw, const struct http_req *req)
{
    return strcmp(req->method, "GET") == 0 &&
           (strcmp(req->path, "/v1/models") == 0 || strcmp(req->path, "/models") == 0) &&
           (gw->has_aliases || gw->nups > 1);
}

static void
add_model(json_t *data, json_t *seen, const char *id, const char *owner)
{
    if (json_object_get(seen, id)) {
        return;
    }
    json_object_set_new(seen, id, json_true());
    json_array_append_new(
        data, json_pack("{s:s,s:s,s:s}", "id", id, "object", "model", "owned_by", owner));
}

static void
models_reply(struct models_fetch *mf)
{
    struct gateway *gw = mf->gw;
    json_t *data = json_array(), *seen = json_object();
    bool partial = false;

    for (size_t i = 0; i < gw->nups; i++) {
        const struct conf_upstream *u = gw->ups[i]->conf;
        for (size_t j = 0; j < u->nmodels; j++) {
            add_model(data, seen, u->models[j].from, u->name);
        }
    }
    for (size_t i = 0; i < mf->nparts; i++) {
        struct models_part *p = &mf->parts[i];
        if (p->status != 200 || !p->body) {
            partial = true;
            continue;
        }
        size_t n = evbuffer_get_length(p->body);
        json_t *doc = json_loadb((const char *)evbuffer_pullup(p->body, -1), n, 0, NULL);
        json_t *arr = doc ? json_object_get(doc, "data") : NULL;
        size_t k;
        json_t *m;
        json_array_foreach(arr, k, m)
        {
            const char *id = json_string_value(json_object_get(m, "id"));
            if (id && !json_object_get(seen, id)) {
                json_object_set_new(seen, id, json_true());
                json_array_append(data, m);
            }
        }
        json_decref(doc);
    }
    json_t *ans = json_pack("{s:s,s:o}", "object", "list", "data", data);
    char *text = ans ? json_dumps(ans, JSON_COMPACT) : NULL;
    json_decref(ans);
    json_decref(seen);
    if (text) {
        free(models_cache);
        models_cache = text;
        /* an incomplete list is kept briefly, so a recovered upstream shows soon */
        models_cache_until_us = http_now_us() + (partial ? MODELS_RETRY_MS : MODELS_TTL_MS) * 1000;
    }
    if (mf->req) {
        static const struct http_header ct[] = {{"Content-Type", "application/json"}};
        if (models_cache) {
            http_reply(mf->req, 200, ct, 1, models_cache, strlen(models_cache));
        } else {
            http_reply_error(mf->req, 500, "internal_error", "out_of_memory", "out of memory");
        }
        mf->req = NULL;
    }
}

static void
models_fetch_free(struct models_fetch *mf)
{
    for (size_t i = 0; i < mf->nparts; i++) {
        struct models_part *p = &mf->parts[i];
        if (p->x) {
            upstream_cancel(p->x);
        }
        if (p->body) {
            evbuffer_free(p->body);
        }
        if (p->auth) {
            explicit_bzero(p->auth, strlen(p->auth));
            free(p->auth);
        }
        free(p->url);
        if (p->up) {
            gw_upstream_unref(p->up);
        }
    }
    free(mf);
}

static int
part_head(void *arg, int status, const struct http_header *h, size_t n)
{
    struct models_part *p = arg;

    (void)h;
    (void)n;
    p->status = status;
    return UP_CONTINUE;
}

static int
part_data(void *arg, const char *data, size_t len)
{
    struct models_part *p = arg;

    if (evbuffer_get_length(p->body) + len > MODELS_MAX_BODY) {
        return UP_ABORT;
    }
    evbuffer_add(p->body, data, len);
    return UP_CONTINUE;
}

static void
part_done(void *arg, enum up_result res, const char *detail)
{
    struct models_part *p = arg;
    struct models_fetch *mf = p->mf;

    p->x = NULL;
    if (res != UP_OK) {
        log_msg(LOG_WARN, "up=%s: model list: %s %s", p->up->conf->name, upstream_result_name(res),
                detail);
        p->status = 0;
    }
    if (--mf->pending == 0) {
        models_reply(mf);
        models_fetch_free(mf);
    }
}

static const struct up_callbacks part_cb = {part_head, part_data, part_done};

static void
models_client_close(void *arg)
{
    struct models_fetch *mf = arg;

    mf->req = NULL;
    models_fetch_free(mf);
}

void
models_handle(struct gateway *gw, struct http_req *req)
{
    static const struct http_header ct[] = {{"Content-Type", "application/json"}};

    if (models_cache && http_now_us() < models_cache_until_us) {
        http_reply(req, 200, ct, 1, models_cache, strlen(models_cache));
        return;
    }
    struct models_fetch *mf = calloc(1, sizeof(*mf));
    if (!mf) {
        http_reply_error(req, 500, "internal_error", "out_of_memory", "out of memory");
        return;
    }
    mf->gw = gw;
    mf->req = req;
    const char *client_auth = http_req_header(req, "Authorization");
    for (size_t i = 0; i < gw->nups; i++) {
        struct gw_upstream *u = gw->ups[i];
        if (u->conf->nmodels > 0 || !circuit_usable(&u->circuit, http_now_us())) {
            continue; /* aliases only, or known to be down */
        }
        struct models_part *p = &mf->parts[mf->nparts];
        p->mf = mf;
        p->up = u;
        gw_upstream_ref(u);
        p->body = evbuffer_new();
        size_t ul = strlen(u->conf->url) + strlen(req->target) + 1;
        p->url = malloc(ul);
        if (u->auth_header) {
            p->auth = strdup(u->auth_header);
        } else if (client_auth) {
            size_t al = strlen(client_auth) + 32;
            if ((p->auth = malloc(al))) {
                snprintf(p->auth, al, "Authorization: %s", client_auth);
            }
        }
        if (!p->body || !p->url) {
            continue;
        }
        snprintf(p->url, ul, "%s%s", u->conf->url, req->target);
        size_t nh = 0;
        p->hdrs[nh++] = "Accept: application/json";
        if (p->auth) {
            p->hdrs[nh++] = p->auth;
        }
        p->hdrs[nh] = NULL;
        struct up_request rq = {
            .method = "GET",
            .url = p->url,
            .headers = p->hdrs,
            .connect_ms = u->conf->connect_ms,
            .total_ms = MODELS_TIMEOUT,
            .ca_file = u->conf->ca_file,
            .insecure = u->conf->insecure,
        };
        mf->nparts++;
        p->x = upstream_start(gw->up, &rq, &part_cb, p);
        if (p->x) {
            mf->pending++;
        }
    }
    if (mf->pending == 0) {
        models_reply(mf);
        models_fetch_free(mf);
        return;
    }
    http_req_set_callbacks(req, models_client_close, NULL, mf);
}

void
models_free(void)
{
    free(models_cache);
    models_cache = NULL;
}
