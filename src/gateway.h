/*
 * gateway: the state of one running dsgate process, shared by the modules
 * that serve requests (server.c admits, request.c proxies), and the
 * applying of a configuration to it (start-up and reload).
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

#include "clients.h"
#include "conf.h"
#include "dialect.h"
#include "retry.h"
#include "route.h"
#include "sched.h"

struct cache_mem;
struct compat;
struct event_base;
struct fleet;
struct fleet_up;
struct dispatch_ops;
struct event;
struct flight_table;
struct http_server;
struct store;
struct http_req;
struct metric_series;
struct request;
struct upstream_ctx;

/*
 * An upstream's run-time state.  Reference counted: the gateway holds one
 * reference while the upstream is configured, each request that uses it
 * another; a reload keeps the object of an upstream that keeps its name
 * (limits, circuit and counters carry over) and points it at the new
 * configuration.
 */
struct conf_ref {
    struct conf *conf;
    int refs;
};

struct gw_upstream {
    int refs;
    struct conf_ref *cref; /* keeps the configuration CONF points into alive */
    const struct conf_upstream *conf;
    size_t idx;               /* position in gateway.ups */
    char *auth_header;        /* "Authorization: Bearer <key>" or NULL; secret */
    struct sched_limit limit; /* in flight and the adaptive limit */
    struct circuit circuit;
    int64_t swrr;           /* smooth weighted round robin state */
    struct fleet_up *fleet; /* leases and the shared limit, in fleet mode */
    /* metric series of this upstream, found once */
    struct metric_series *m_tokens[TOK_KINDS];
    struct {
        const char *outcome;
        struct metric_series *s;
    } m_attempts[16];
    size_t n_m_attempts;
    struct event *wake;     /* pumps the queue when an open circuit may close */
    struct gateway *gw;
    /* the answer that opened the circuit on 401/402/403, replayed while it is open */
    int auth_status;
    char *auth_body;
    size_t auth_body_len;
};

struct gateway {
    struct event_base *base;
    struct conf *conf; /* current: cref->conf */
    struct conf_ref *cref;
    struct upstream_ctx *up;
    struct http_server *srv;
    struct gw_upstream **ups;
    size_t nups;
    bool has_aliases;          /* some upstream has a models map */
    struct clients clients;  /* who sends requests, their limits and state (clients.h) */
    struct event *client_wake; /* the soonest a client's bucket lets a queued request go */
    bool client_pump;          /* a capped client's transfer ended: pump from the loop (later) */
    int64_t client_wake_us;    /* found while pumping: that soonest, from now; 0: none */
    struct sched_set queue;  /* requests waiting for an upstream slot */
    struct cache_mem *mem;   /* memory tier of the cache */
    struct store *store;     /* Redis tier, or NULL */
    struct compat *compat;   /* remembered reasoning (compat.reasoning_content) */
    struct fleet *fleet;     /* fleet mode, or NULL */
    char *cache_group;       /* upstream names, part of every cache key */
    struct flight_table *flights; /* cacheable requests in flight, by key */
    const struct dispatch_ops *dispatch_ops; /* how dispatch.c tells request.c */
    struct retry_budget budget;
    size_t live_requests;
    struct request *live;    /* every request not yet ended */
    struct request *pending; /* to be dispatched again by the loop (REQ_PENDING) */
    struct request *reap;    /* ended, to be freed by the loop (REQ_DONE) */
    struct event *later;     /* runs the two lists above */
    size_t held;             /* running attempts their upstream holds (dispatch.c) */
    bool pump_wanted;        /* dispatch_pump from the loop (later) */
    bool draining;
};

/*
 * Make C the gateway's configuration (takes ownership of C): at start-up
 * and on reload.  Upstreams are matched by name; keys and client tokens
 * are read from the environment again.  0, or -1 (nothing changed).
 */
int gateway_apply(struct gateway *gw, struct conf *c);
void gateway_free(struct gateway *gw);
/* Local concurrency caps again (fleet mode went into or out of fallback). */
void gateway_refresh_limits(struct gateway *gw);
struct http_limits;
void gateway_limits(const struct conf *c, struct http_limits *l);
void gw_upstream_ref(struct gw_upstream *u);
void gw_upstream_unref(struct gw_upstream *u);

#endif
