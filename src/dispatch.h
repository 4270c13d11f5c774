/*
 * dispatch: which upstream a request goes to, and when.
 *
 * Requests that can use the same upstreams share a queue (sched.h); a
 * request starts at once when a slot is free and nobody waits before it,
 * else it waits in its class.  Every choice of upstream goes through one
 * candidate filter (takes the request's dialect and model, circuit
 * usable, below its limit, fleet lease ready, not tried yet).  A cheap
 * request (token counting) needs no slot or lease: it goes at once,
 * outside the limit, and never waits behind completions.  It holds the slots and
 * leases of running attempts and feeds attempt outcomes to the circuit
 * breakers and adaptive limits.
 *
 * It tells the owner through struct dispatch_ops (registered in the
 * gateway): start an attempt on an upstream, or refuse a queued request
 * (displaced by a higher class, or every upstream shut by 401/402/403).
 */
#ifndef DSGATE_DISPATCH_H
#define DSGATE_DISPATCH_H

#include <stdbool.h>

#include <event2/util.h>

#include "clients.h"
#include "route.h"

struct gateway;
struct gw_upstream;
struct request;

enum dispatch_refusal { REFUSE_DISPLACED, REFUSE_AUTH, REFUSE_UNREACHABLE };

struct dispatch_ops {
    /* A slot of UP is the request's: start the attempt (the request has left the queue). */
    void (*start)(struct request *r, struct gw_upstream *up);
    /*
     * A queued request is refused (it has left the queue): shed, every
     * upstream shut by auth (U: whose answer), or none reachable.
     */
    void (*refuse)(struct request *r, enum dispatch_refusal why, struct gw_upstream *u);
    /*
     * A running attempt that the upstream holds (keep-alives, no data) is
     * taken back so that a higher class waiting for its upstream goes
     * first: cancel it and wait in the queue again (transparently).
     */
    void (*shed)(struct request *r);
};

enum dispatch_result {
    DISPATCH_GO,     /* *UP is free now: start the attempt */
    DISPATCH_QUEUED, /* waiting in the queue; ops.start or ops.refuse follow */
    DISPATCH_FULL,   /* the queue is full and nothing lower could be shed */
};

/* Does any upstream take this request's dialect (upstreams[].dialects)? */
bool dispatch_dialect_served(const struct request *r);
/* Does any upstream take this request's dialect and model? */
bool dispatch_any_eligible(const struct request *r);
/*
 * When every eligible upstream is shut by 401/402/403, waiting will not
 * help: the upstream whose answer the client should get, else NULL.
 */
struct gw_upstream *dispatch_auth_blocked(const struct request *r);
/*
 * No eligible upstream can be reached (every circuit open on connect
 * errors, or on 401/402/403 with at least one on connect errors): ms until
 * the soonest probe; -1 when some upstream may take the request.
 */
int64_t dispatch_unreachable(const struct request *r);
/* The current upstream failed the request: is one it has not tried usable and free now? */
bool dispatch_alternative(struct request *r);
/* A backoff ends: every candidate may be tried again. */
void dispatch_forget_tried(struct request *r);

/* Admission: at once, queued (shedding a lower class when full), or full. */
enum dispatch_result dispatch_submit(struct request *r, struct gw_upstream **up);
/* Back from a backoff: at once or queued, never refused. */
enum dispatch_result dispatch_requeue(struct request *r, struct gw_upstream **up);
/* The same, queued at the place of one that arrived at T_ENQ_US (a shed attempt). */
enum dispatch_result dispatch_requeue_at(struct request *r, struct gw_upstream **up,
                                         int64_t t_enq_us);
/* Out of the queue (deadline, client gone, shutdown): its wait is counted. */
void dispatch_leave(struct request *r);
/* Start queued requests while slots are free. */
void dispatch_pump(struct gateway *gw);

/* The attempt on UP runs: its slot, lease and the breaker's count. */
void dispatch_acquire(struct request *r, struct gw_upstream *up);
/* The attempt is over: slot and lease back. */
void dispatch_release(struct request *r);
/* The same for attempt A of R (a hedge). */
struct attempt;
void dispatch_acquire_at(struct request *r, struct attempt *a, struct gw_upstream *up);
void dispatch_release_at(struct request *r, struct attempt *a);
/* Where a hedge of R's attempt may go now: another eligible upstream with a free slot, or NULL. */
struct gw_upstream *dispatch_hedge_target(struct request *r);
/* What the breaker and the adaptive limit of the attempt's upstream hear. */
void dispatch_circuit(struct request *r, enum route_outcome o, const char *reason);
void dispatch_limit(struct request *r, bool overload);
/*
 * The attempt is held by its upstream (keep-alives before data): an
 * overload signal for the limit, and higher classes may displace it.
 */
void dispatch_held(struct request *r);
/* The attempt's first data byte, FIRST_DATA_US after it started: a success for the limit. */
void dispatch_first_data(struct request *r, int64_t first_data_us);
/* dsgate_upstream_attempts_total{upstream,outcome}. */
void dispatch_count(struct request *r, const char *outcome);
/* The same three for attempt A of R (a hedge, or the attempt a hedge beat). */
void dispatch_count_at(struct request *r, struct attempt *a, const char *outcome);
void dispatch_limit_at(struct request *r, struct attempt *a, bool overload);
void dispatch_circuit_at(struct request *r, struct attempt *a, enum route_outcome o,
                         const char *reason);

/* Publish the queue and limiter gauges. */
void dispatch_update_gauges(struct gateway *gw);
/* Timer callback of gw_upstream.wake: an open circuit may let requests through. */
void dispatch_wake_cb(evutil_socket_t fd, short what, void *arg);

/*
 * Clients (clients.h): may R be admitted by its client's limits?  Its
 * quotas are reserved when they allow it now; CLIENT_OK also when they
 * do not but it may wait in the queue (over_limit: queue); else the
 * reason to refuse it (429) and *WAIT_US until the limit allows.
 */
enum client_reason dispatch_client_admit(struct request *r, int64_t *wait_us);
/* R is over: its client's reservation becomes what its answer used, or is refunded. */
void dispatch_client_settle(struct request *r);
/* gw->client_wake: a client's bucket lets a queued request go. */
void dispatch_client_wake_cb(evutil_socket_t fd, short what, void *arg);

#endif
