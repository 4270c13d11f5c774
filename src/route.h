/*
 * route: which upstream a request may use, and how each one is doing.
 *
 * Eligibility: an upstream with a non-empty `models` map takes only those
 * client model names (and gets the mapped name); one with an empty map
 * takes any model.
 *
 * Circuit breaker per upstream: ROUTE_TRIP_FAILURES consecutive failures
 * (5xx, 429, connect errors, timeouts) open it for a cooldown that doubles
 * on each failed probe (ROUTE_COOLDOWN_MS up to ROUTE_COOLDOWN_MAX_MS);
 * when the cooldown ends it is half open and lets a single probe through;
 * a success closes it.  401, 402 and 403 open it at once for
 * ROUTE_AUTH_COOLDOWN_MS, doubling on each failed probe up to
 * ROUTE_AUTH_COOLDOWN_MAX_MS: the account, not the server, is at fault,
 * and a key fixed or a balance topped up is found by the next probe.  A
 * late failure of an earlier attempt does not turn an auth-open circuit
 * into a failure-open one.
 *
 * Selection among eligible, usable upstreams with a free slot: `failover`
 * takes the first in list order (overflowing to the next when one is at
 * its limit); `weighted` uses smooth weighted round robin (nginx's), which
 * keeps each share within one pick of its weight at every moment, where
 * power-of-two-choices would only converge on average.
 *
 * Model rewriting in answers: "model":"<upstream name>" becomes the client's
 * name again, in a byte stream split anywhere (SSE events or one body).
 */
#ifndef DSGATE_ROUTE_H
#define DSGATE_ROUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"

#define ROUTE_MAX_UPSTREAMS    64
#define ROUTE_TRIP_FAILURES    5
#define ROUTE_COOLDOWN_MS      5000
#define ROUTE_COOLDOWN_MAX_MS  120000
#define ROUTE_AUTH_COOLDOWN_MS     30000
#define ROUTE_AUTH_COOLDOWN_MAX_MS 300000

struct evbuffer;

enum circuit_state { CIRCUIT_CLOSED, CIRCUIT_OPEN, CIRCUIT_HALF_OPEN };

struct circuit {
    enum circuit_state state;
    int failures; /* consecutive */
    int64_t open_until_us;
    int64_t cooldown_ms;
    bool probe_inflight;
    bool auth;       /* opened by 401/402/403 */
    int64_t auth_cooldown_ms;
    char reason[16]; /* "503", "timeout", "402", ... */
};

enum route_outcome { ROUTE_SUCCESS, ROUTE_FAILURE, ROUTE_AUTH_FAILURE, ROUTE_NEUTRAL };

void circuit_init(struct circuit *c);
/* May a request go to this upstream now?  Moves OPEN to HALF_OPEN when due. */
bool circuit_usable(struct circuit *c, int64_t now_us);
/* A request is about to be sent: in HALF_OPEN it is the probe. */
void circuit_on_send(struct circuit *c);
/* Returns true when the state changed (for logs and metrics). */
bool circuit_on_result(struct circuit *c, enum route_outcome o, const char *reason, int64_t now_us);
const char *circuit_state_name(enum circuit_state s);

/* Outcome class of an upstream answer or error. */
enum route_outcome route_classify_status(int status);

/* The name this upstream wants for client model MODEL, or NULL if it does not take it. */
const char *route_model_for(const struct conf_upstream *u, const char *model);

/*
 * Smooth weighted round robin: pick among the N candidate indexes CAND;
 * CURRENT and WEIGHTS are indexed by upstream.
 */
size_t route_swrr_pick(int64_t *current, const int *weights, const size_t *cand, size_t n);

/* Streaming rewrite of "model":"FROM" into "model":"TO". */
struct model_rewrite {
    char *from;
    char *to;
    char *carry; /* bytes held back: maybe the start of a match */
    size_t carry_len;
};
int model_rewrite_init(struct model_rewrite *m, const char *from, const char *to);
/* Append the rewritten form of IN to OUT, holding back a possible partial match. */
void model_rewrite_feed(struct model_rewrite *m, const char *in, size_t len, struct evbuffer *out);
/* Flush what is held back. */
void model_rewrite_flush(struct model_rewrite *m, struct evbuffer *out);
void model_rewrite_free(struct model_rewrite *m);

#endif
