/*
 * gateway: the state of one running dsgate process, shared by the modules
 * that serve requests (server.c admits, request.c proxies).
 *
 * The struct conf is immutable; a reload replaces the pointer.  Run-time
 * state that must outlive a reload (per-upstream counters) lives in
 * struct gw_upstream, matched to the configuration by name.
 */
#ifndef DSGATE_GATEWAY_H
#define DSGATE_GATEWAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/util.h>

#include "conf.h"
#include "retry.h"
#include "route.h"
#include "sched.h"

struct cache_mem;
struct event_base;
struct flight;
struct http_server;
struct store;
struct http_req;
struct upstream_ctx;

struct gw_upstream {
    const struct conf_upstream *conf;
    size_t idx;                 /* position in gateway.ups */
    char *auth_header;          /* "Authorization: Bearer <key>" or NULL; secret */
    struct sched_limit limit;   /* in flight and the adaptive limit */
    struct circuit circuit;
    struct event *wake;         /* pumps the queue when an open circuit may close */
    struct gateway *gw;
    /* the answer that opened the circuit on 401/402/403, replayed while it is open */
    int auth_status;
    char *auth_body;
    size_t auth_body_len;
};

struct gw_client {
    char *token;                /* secret */
    size_t token_len;
    enum prio priority;
};

struct gateway {
    struct event_base *base;
    struct conf *conf;
    struct upstream_ctx *up;
    struct http_server *srv;
    struct gw_upstream *ups;
    size_t nups;
    int64_t swrr[ROUTE_MAX_UPSTREAMS];  /* smooth weighted round robin state */
    bool has_aliases;           /* some upstream has a models map */
    struct gw_client *clients;  /* those whose token variable is set */
    size_t nclients;
    bool require_client;        /* clients: configured */
    struct sched_queue queue;   /* requests waiting for an upstream slot */
    struct cache_mem *mem;      /* memory tier of the cache */
    struct store *store;        /* Redis tier, or NULL */
    char *cache_group;          /* upstream names, part of every cache key */
    struct flight **flights;    /* cacheable requests in flight, by key */
    size_t nflight_buckets;
    struct retry_budget budget;
    size_t live_requests;
    bool draining;
};

/* Build the per-upstream state for GW->conf (keys read from the environment). */
int gateway_setup_upstreams(struct gateway *gw);
void gateway_free_upstreams(struct gateway *gw);

/* The front door: every request from http.c lands here. */
void server_handle(struct http_req *req, void *arg);

/*
 * Proxy an admitted request (request.c).  Takes over REQ.  DOC is the
 * parsed body of a request on a cache path (borrowed), else NULL.
 */
void request_start(struct gateway *gw, struct http_req *req, enum prio prio, const void *doc);

/* Set up and tear down the cache tiers and the in-flight table. */
int request_cache_setup(struct gateway *gw);
void request_cache_free(struct gateway *gw);

/* Start queued requests while upstream slots are free. */
void request_pump(struct gateway *gw);

/* GET /v1/models answered from every upstream's list and the aliases (models.c). */
bool models_wanted(const struct gateway *gw, const struct http_req *req);
void models_handle(struct gateway *gw, struct http_req *req);
void models_free(void);

/* Timer callback of gw_upstream.wake: an open circuit may let requests through. */
void request_wake_cb(evutil_socket_t fd, short what, void *arg);

/* Publish the queue and limiter gauges. */
void request_update_gauges(struct gateway *gw);

#endif
