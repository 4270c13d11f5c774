/*
 * gateway: applying a configuration to the running process, at start-up
 * and on SIGHUP.
 *
 * Upstreams are matched by name: one that stays keeps its run-time object
 * (in-flight count, adaptive limit, circuit), pointed at the new settings;
 * one that goes is dropped from the list and freed when its last request
 * ends; a new one starts fresh.  The old configuration lives as long as an
 * upstream object still points into it (struct conf_ref).  The cache tiers
 * take their new bounds; a changed Redis URL gets a new connection.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "cache.h"
#include "compat.h"
#include "dispatch.h"
#include "fleet.h"
#include "gateway.h"
#include "http.h"
#include "log.h"
#include "store.h"

static void
conf_ref_unref(struct conf_ref *cr)
{
    if (cr && --cr->refs == 0) {
        conf_free(cr->conf);
        free(cr);
    }
}

static void
secret_free(char *s)
{
    if (s) {
        explicit_bzero(s, strlen(s));
        free(s);
    }
}

void
gw_upstream_ref(struct gw_upstream *u)
{
    u->refs++;
}

void
gw_upstream_unref(struct gw_upstream *u)
{
    if (--u->refs > 0) {
        return;
    }
    secret_free(u->auth_header);
    if (u->wake) {
        event_free(u->wake);
    }
    free(u->auth_body);
    conf_ref_unref(u->cref);
    free(u);
}

/* "Authorization: Bearer KEY" from the upstream's variable, or NULL. */
static char *
auth_header_for(const struct conf_upstream *uc)
{
    const char *key = uc->api_key_env[0] ? getenv(uc->api_key_env) : NULL;

    if (!key || !*key) {
        return NULL;
    }
    size_t n = strlen(key) + 32;
    char *h = malloc(n);
    if (h) {
        snprintf(h, n, "Authorization: Bearer %s", key);
    }
    return h;
}

static struct gw_upstream *
find_upstream(struct gateway *gw, const char *name)
{
    for (size_t i = 0; i < gw->nups; i++) {
        if (strcmp(gw->ups[i]->conf->name, name) == 0) {
            return gw->ups[i];
        }
    }
    return NULL;
}

static char *
cache_group_of(const struct conf *c)
{
    size_t gl = 1;

    for (size_t i = 0; i < c->nupstreams; i++) {
        gl += strlen(c->upstreams[i].name) + 1;
    }
    char *g = calloc(1, gl);
    if (g) {
        for (size_t i = 0; i < c->nupstreams; i++) {
            strcat(g, c->upstreams[i].name);
            strcat(g, ",");
        }
    }
    return g;
}

/* The fleet's hooks: leases came or went, the mode changed, who waits. */
static void
fleet_capacity(void *arg)
{
    dispatch_pump(arg);
}

static void
fleet_mode(void *arg)
{
    gateway_refresh_limits(arg);
    dispatch_pump(arg);
}

static size_t
fleet_waiting(void *arg)
{
    const struct gateway *gw = arg;

    return gw->queue.total;
}

int
gateway_apply(struct gateway *gw, struct conf *c)
{
    struct conf_ref *cref = calloc(1, sizeof(*cref));
    struct gw_upstream **ups = calloc(c->nupstreams, sizeof(*ups));
    struct clients clients = {0};
    char *group = cache_group_of(c);

    if (!cref || !ups || !group || clients_build(c, &gw->clients, &clients, http_now_us()) < 0) {
        free(cref);
        free(ups);
        free(group);
        conf_free(c);
        return -1;
    }
    cref->conf = c;
    cref->refs = 1; /* the gateway's */

    /* fleet mode starts with the process (fleet.redis needs a restart) */
    if (!gw->cref && c->fleet.redis[0]) {
        static const struct fleet_hooks hooks0 = {fleet_capacity, fleet_mode, fleet_waiting, NULL};
        struct fleet_hooks hooks = hooks0;
        hooks.arg = gw;
        gw->fleet = fleet_new(gw->base, &hooks, c->fleet.redis, c->fleet.lease_ttl_ms,
                              c->fleet.fallback_instances);
        if (!gw->fleet) {
            log_msg(LOG_ERROR, "fleet.redis cannot be used; fleet mode is off");
        }
    } else if (gw->fleet) {
        fleet_configure(gw->fleet, c->fleet.lease_ttl_ms, c->fleet.fallback_instances);
    }

    /* upstreams: keep the objects of those that stay */
    bool has_aliases = false;
    for (size_t i = 0; i < c->nupstreams; i++) {
        const struct conf_upstream *uc = &c->upstreams[i];
        struct gw_upstream *u = find_upstream(gw, uc->name);
        int local_max = fleet_local_max(gw->fleet, uc->max_inflight);
        if (u) {
            gw_upstream_ref(u);
            sched_limit_configure(&u->limit, local_max, uc->adaptive);
            secret_free(u->auth_header);
            conf_ref_unref(u->cref);
        } else {
            u = calloc(1, sizeof(*u));
            if (!u) {
                log_msg(LOG_ERROR, "out of memory applying the configuration");
                abort();
            }
            u->refs = 1;
            u->gw = gw;
            sched_limit_init(&u->limit, local_max, uc->adaptive);
            circuit_init(&u->circuit);
            u->wake = evtimer_new(gw->base, dispatch_wake_cb, u);
        }
        u->conf = uc;
        u->cref = cref;
        cref->refs++;
        u->idx = i;
        u->auth_header = auth_header_for(uc);
        u->fleet = gw->fleet ? fleet_up_get(gw->fleet, uc->name) : NULL;
        has_aliases |= uc->nmodels > 0;
        ups[i] = u;
    }
    for (size_t i = 0; i < gw->nups; i++) {
        gw_upstream_unref(gw->ups[i]); /* dropped ones go when their requests end */
    }
    free(gw->ups);
    gw->ups = ups;
    gw->nups = c->nupstreams;
    gw->has_aliases = has_aliases;

    clients_free(&gw->clients); /* dropped ones go when their requests end */
    gw->clients = clients;

    /* cache tiers */
    free(gw->cache_group);
    gw->cache_group = group;
    const char *old_url = gw->conf ? gw->conf->cache.redis_url : "";
    bool want_store = c->cache.enabled && c->cache.redis_url[0];
    if (gw->mem) {
        cache_mem_configure(gw->mem, (size_t)c->cache.max_entries, (size_t)c->cache.max_bytes);
    } else {
        gw->mem = cache_mem_new((size_t)c->cache.max_entries, (size_t)c->cache.max_bytes);
    }
    if (gw->store && (!want_store || strcmp(old_url, c->cache.redis_url) != 0)) {
        store_free(gw->store); /* pending lookups end as misses */
        gw->store = NULL;
    }
    if (gw->store) {
        store_configure(gw->store, c->cache.redis_prefix, c->cache.redis_timeout_ms);
    } else if (want_store) {
        gw->store = store_new(gw->base, c->cache.redis_url, c->cache.redis_prefix,
                              c->cache.redis_timeout_ms);
    }

    if (gw->compat) {
        compat_configure(gw->compat, c);
    } else {
        gw->compat = compat_new(c); /* NULL out of memory: nothing restored */
    }

    if (gw->srv) {
        struct http_limits lim;
        gateway_limits(c, &lim);
        http_server_set_limits(gw->srv, &lim);
    }
    conf_ref_unref(gw->cref);
    gw->cref = cref;
    gw->conf = c;
    return gw->mem ? 0 : -1;
}

void
gateway_limits(const struct conf *c, struct http_limits *l)
{
    l->max_body = (size_t)c->limits.max_body;
    l->max_headers = (size_t)c->limits.max_headers;
    l->max_connections = c->limits.max_connections;
    l->header_timeout_ms = c->limits.header_timeout_ms;
    l->body_timeout_ms = c->limits.body_timeout_ms;
    l->idle_timeout_ms = c->limits.idle_timeout_ms;
}

void
gateway_refresh_limits(struct gateway *gw)
{
    for (size_t i = 0; i < gw->nups; i++) {
        struct gw_upstream *u = gw->ups[i];
        sched_limit_configure(&u->limit, fleet_local_max(gw->fleet, u->conf->max_inflight),
                              u->conf->adaptive);
    }
}

void
gateway_free(struct gateway *gw)
{
    /* the cache link first: its write replies announce to the fleet */
    store_free(gw->store);
    gw->store = NULL;
    fleet_free(gw->fleet);
    gw->fleet = NULL;
    for (size_t i = 0; i < gw->nups; i++) {
        gw_upstream_unref(gw->ups[i]);
    }
    free(gw->ups);
    gw->ups = NULL;
    gw->nups = 0;
    clients_free(&gw->clients);
    cache_mem_free(gw->mem);
    gw->mem = NULL;
    compat_free(gw->compat);
    gw->compat = NULL;
    free(gw->cache_group);
    gw->cache_group = NULL;
    conf_ref_unref(gw->cref);
    gw->cref = NULL;
    gw->conf = NULL;
}
