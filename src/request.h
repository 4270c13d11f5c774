/*
 * request: one proxied request, its state machine and its retry decision
 * (request.c).  The parts of its life live in their own modules, each with
 * its own fields here: dispatch.c (queues, slots, upstream choice),
 * attempt.c (one try against one upstream), flight.c (identical requests
 * in flight).  They report back through the ops tables that request.c
 * registers; none of them ends or frees a request.
 */
#ifndef DSGATE_REQUEST_H
#define DSGATE_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "access.h"
#include "attempt.h"
#include "cache.h"
#include "dialect.h"
#include "sched.h"
#include "sse.h"

struct cache_entry;
struct compat_req;
struct evbuffer;
struct event;
struct fleet_wait;
struct flight;
struct gateway;
struct http_req;
struct store_get;

/*
 * Where a request is, and the deadline its timer runs (drawn in request.c).
 * Changed only by request.c's set_state().
 */
enum req_state {
    REQ_NEW,       /* gw->live only; no deadline */
    REQ_LOOKUP,    /* waiting for the Redis tier (sget, or compat's); the store's own timeout */
    REQ_FLEET,     /* fleet claim or wait (fwait); fleet.lease_ttl, the fleet's timer */
    REQ_FOLLOWING, /* flight->followers, replaying the leader; none (the leader's) */
    REQ_PENDING,   /* gw->pending: let go by a failed flight, dispatched by the loop; none */
    REQ_QUEUED,    /* gw->queue; deadline queue.max_wait (from arrival) */
    REQ_BACKOFF,   /* no list; the timer is the backoff */
    REQ_ATTEMPT,   /* att.xfer runs, no data byte yet; deadline timeouts.first_data */
    REQ_STREAMING, /* att.xfer runs, data flows; deadline timeouts.idle, rearmed per piece */
    REQ_DONE,      /* ended: answered, logged, counted; gw->reap until the reaper frees it */
    REQ_STATES
};

extern const char *const req_state_name[REQ_STATES];

struct request {
    struct sched_item item; /* first: dispatch queues link requests through it */
    enum req_state state;
    int refs;
    struct gateway *gw;
    struct request *lprev, *lnext; /* gw->live while not DONE */
    struct request *later;         /* gw->pending or gw->reap */
    struct event *timer;           /* the state's deadline */

    /* the client; NULL once its reply ended or it left */
    struct http_req *hreq;
    uint64_t id;
    char method[16];
    char *path;   /* copy, for the access log */
    char *target; /* path and query */
    const struct dialect *dialect; /* from the path, once: errors, keep-alives, usage, caching */
    bool cheap;   /* the dialect's cheap path (token counting): never queued, no slot */
    enum prio prio;
    struct gw_client *client; /* who sent it (clients.h); a reference */
    int64_t est;              /* the tokens it may use, reserved from the client's quotas */
    bool client_taken;        /* its request and tokens are reserved (settled at the end) */
    unsigned throttled;       /* bits of enum client_reason it was held back for (counted once) */
    char *body;
    size_t body_len;
    size_t bytes_in; /* the body as the client sent it (BODY may get reasoning back) */
    char *model; /* the client's "model", or NULL */
    size_t model_off, model_len; /* its JSON string in BODY, for a rename */
    struct compat_req *compat;   /* compat.c: reasoning to put back, the answer to learn from */
    struct client_headers ch; /* what of the client's headers goes upstream */

    /* the reply */
    struct event *ka; /* keepalive.after, then .every: dsgate's own head and keep-alives */
    bool want_sse;    /* the body asks for a stream ("stream": true) */
    bool early;       /* dsgate sent the 200 head itself, before the upstream's */
    int status;
    bool sse;
    bool replied;   /* a reply head went to the client or the flight */
    bool data_sent; /* a data byte went out (SSE comments and blank lines are not data) */
    struct sse_scan scan; /* of what the client got, for data and error framing */
    uint64_t bytes_out;
    enum req_end end;
    int late_status;

    /* attempts and retries */
    struct attempt *att;     /* the attempt that counts: one of atts[] */
    struct attempt atts[2];  /* the other one runs as a hedge (timeouts.hedge_after) */
    int shed;        /* attempts taken back for a higher class (not counted against max_attempts) */
    /* hedging (timeouts.hedge_after): the other slot of atts[] races the attempt */
    struct event *hedge;      /* hedge_after: start the hedge */
    struct event *hedge_kill; /* stop the attempt that lost, from the loop */
    bool racing;              /* both run; the first data byte wins */
    bool hedge_sse;           /* the hedge's answer is a stream */
    bool hedge_headed;        /* the hedge's 200 head came */
    char hedge_ctype[128];
    struct sse_scan hscan;    /* the hedge's bytes while racing: data or keep-alives */
    char *lease;     /* dispatch: fleet lease held by the current attempt */
    uint64_t tried;  /* upstreams tried since the last backoff (bits) */
    int attempts;
    int backoffs;
    int64_t next_delay_ms; /* backoff chosen for the coming retry */
    int64_t prev_delay_ms;
    bool moving; /* the coming retry goes to another upstream at once */
    const char *retry_reason;
    char retry_status[8];

    /* times */
    int64_t queue_us; /* time spent queued, all attempts */
    int64_t t_start_us;
    int64_t t_up_start_us;
    int64_t t_first_data_us;

    /* cache and coalescing */
    bool cache_path; /* on cache.paths: its tokens are counted */
    bool cacheable;  /* on a cache path with the cache enabled */
    bool lookup;    /* may be answered from the cache */
    bool store_ok;  /* its answer may be stored */
    bool may_join;  /* may follow an identical request in flight */
    enum cache_status cache_status;
    uint8_t key[CACHE_KEY_LEN];
    struct store_get *sget;
    struct fleet_wait *fwait;
    bool fleet_leader;  /* claimed the key fleet-wide */
    bool fleet_checked; /* the fleet was asked about this key */
    struct flight *flight;          /* flight.c: led or followed */
    struct request *fnext, *fprev;  /* flight.c: the followers */
    size_t follow_off;
    bool follow_started;
};

/* Does anyone still want this request's answer (its client, or followers)? */
bool request_wanted(const struct request *r);

/*
 * The retry rule of an attempt outcome: what the breaker and the limit
 * hear, whether it may be retried and under which switch, and the error
 * a client gets when it is not.  One table in request.c.
 */
enum retry_switch { RS_NEVER, RS_DECIDED, RS_ON_CONNECT, RS_ON_TIMEOUT };

struct outcome_rule {
    enum route_outcome circuit; /* ROUTE_NEUTRAL: the breaker heard the head already */
    const char *circuit_reason;
    bool overload; /* the adaptive limit hears an overload */
    enum retry_switch retry;
    int status;            /* the error for the client */
    const char *code;
    const char *message;
    enum req_end end;
};

const struct outcome_rule *request_outcome_rule(enum attempt_outcome o);

struct conf;
/*
 * Is outcome O retryable in principle (before budget, deadline and
 * attempts are looked at)?  DATA_SENT: a data byte reached the client.
 * A reply head that went out (an SSE head, keep-alives) does not stop a
 * retry: the next attempt's events continue the same reply.
 */
bool request_outcome_retryable(const struct conf *c, enum attempt_outcome o, bool data_sent);

/* How a request ends when its client leaves in STATE. */
enum req_end request_left_end(enum req_state state, bool data_sent);

/* ---- for the gateway ---- */

/*
 * What the front door learnt of a request's body: its parsed tree for the
 * canonical cache key (borrowed, or NULL), its cache key when known, and
 * the top-level "model" from the validity check (the same parse routing
 * and renaming use).
 */
struct request_body_info {
    const void *doc;
    const uint8_t *known_key; /* from lookup_known_key() or lookup_raw_key(), or NULL */
    const uint8_t *raw_key;   /* the exact bytes' digest lookup_known_key() made, or NULL */
    const char *model;        /* decoded, or NULL */
    size_t model_off, model_len;
    struct gw_client *client; /* its client (server.c) */
};

/* Proxy an admitted request.  Takes over REQ.  CACHE_PATH: on cache.paths. */
void request_start(struct gateway *gw, struct http_req *req, enum prio prio, bool cache_path,
                   const struct request_body_info *bi);
/* Set up and tear down what requests share: the flight table, the reaper. */
int request_setup(struct gateway *gw);
void request_teardown(struct gateway *gw);
/* At exit: every request still queued or in flight gets an answer now. */
void request_shutdown(struct gateway *gw);

#endif
