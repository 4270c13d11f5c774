/*
 * clients: who sent a request, and what that client may still do.
 *
 * Every proxied request belongs to one client (struct gw_client):
 *
 *   - with clients that have a token_env, the token the request carries
 *     (Authorization: Bearer, or x-api-key on Anthropic paths) picks it; a
 *     request without one is refused (server.c, 401);
 *   - with none (no clients, or clients without token_env), the request
 *     header X-Dsgate-Client names it (case-insensitive; an unauthenticated
 *     hint, for fairness between cooperating apps, not for enforcement
 *     against a hostile one); no header, or a name no entry has: the client
 *     "default" (weight 1, no limits, unless an entry named default says
 *     otherwise).
 *
 * A client holds its limits and its live state:
 *
 *   in flight     transfers to upstreams now (max_inflight caps them)
 *   rpm, tpm      token buckets (struct bucket): a burst of one minute's
 *                 worth, refilled continuously
 *   day budget    tokens spent today (UTC), answers' usage plus what is
 *                 reserved by requests still running
 *   finish[]      its last start-time fair queuing tag per class (sched.h)
 *
 * Quotas are taken once per request, when its first attempt is admitted
 * to an upstream (client_take): one request and the token estimate
 * (prompt bytes / 4 + max_tokens, or max_tokens_default) are reserved, so
 * N parallel requests cannot overshoot the bucket by more than one
 * reservation.  client_settle replaces the reservation by the answer's
 * usage, or refunds it when the request got no answer.  Cache hits and
 * coalesced followers take nothing: they cost the account nothing.
 *
 * Objects are shared by the requests that use them (refs): a reload keeps
 * the object and its state for a name that stays, and a client that is
 * dropped lives until its last request ends.
 */
#ifndef DSGATE_CLIENTS_H
#define DSGATE_CLIENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"
#include "dialect.h"

struct metric_series;

/* A token bucket: CAP tokens at most, refilled at RATE per microsecond; CAP 0: no limit. */
struct bucket {
    double level;
    double cap;
    double rate; /* per us */
    int64_t t_us; /* level is as of then */
};

void bucket_configure(struct bucket *b, int64_t per_minute, int64_t now_us);
void bucket_refill(struct bucket *b, int64_t now_us);
/* Microseconds until NEED tokens are there (0: now); a need above the burst waits for a full bucket. */
int64_t bucket_wait_us(struct bucket *b, double need, int64_t now_us);
/* Microseconds until the bucket is full again (OpenAI's x-ratelimit-reset-*). */
int64_t bucket_reset_us(struct bucket *b, int64_t now_us);
/* Take N (the level may go below 0: a debt the refill pays first); give back N (at most to CAP). */
void bucket_take(struct bucket *b, double n, int64_t now_us);
void bucket_give(struct bucket *b, double n, int64_t now_us);

enum client_reason {
    CLIENT_OK,
    CLIENT_MAX_INFLIGHT,
    CLIENT_RPM,
    CLIENT_TPM,
    CLIENT_DAY,
    CLIENT_REASONS
};

extern const char *const client_reason_name[CLIENT_REASONS];

struct gw_client {
    char *name;
    char *token; /* secret; NULL for a tokenless client */
    size_t token_len;
    enum prio priority;
    int weight;
    int max_inflight;
    int64_t rpm, tpm, tokens_per_day, max_tokens_default;
    bool reject; /* over_limit: reject */

    int refs;     /* the gateway's list and each request's */
    int inflight; /* upstream transfers */
    size_t queued;
    struct bucket req, tok;
    int64_t day;          /* the UTC day tokens_today counts */
    int64_t tokens_today; /* settled */
    int64_t reserved;     /* estimates of requests still running */
    double finish[PRIO_COUNT];
    struct metric_series *m_tokens[TOK_KINDS];
};

/* The clients of configuration C, with the state of those in OLD that keep their name. */
struct clients {
    struct gw_client **v;
    size_t n;
    struct gw_client *deflt; /* tokenless requests' client; NULL when tokens are required */
    bool require_token;
};

int clients_build(const struct conf *c, const struct clients *old, struct clients *out,
                  int64_t now_us);
void clients_free(struct clients *cs);

/* The client named NAME (case-insensitive), or NULL. */
struct gw_client *clients_by_name(const struct clients *cs, const char *name);
/* The client whose token is TOKEN (TL bytes; constant time per token), or NULL. */
struct gw_client *clients_by_token(const struct clients *cs, const char *token, size_t tl);

void client_ref(struct gw_client *cl);
void client_unref(struct gw_client *cl);

/* The tokens a request may use: BODY's bytes / 4 plus its max_tokens (or the default). */
int64_t client_estimate(const struct gw_client *cl, const char *body, size_t len);

/*
 * May a request of CL that needs EST tokens start now?  CLIENT_OK, or the
 * first limit in the way (*WAIT_US: how long until it allows, -1: until a
 * transfer of the client ends; CLIENT_DAY: until the next UTC day).
 * WALL_S is the time of day (seconds since the epoch).
 */
enum client_reason client_check(struct gw_client *cl, int64_t est, int64_t now_us, int64_t wall_s,
                                int64_t *wait_us);
/* Reserve one request and EST tokens (the first attempt is admitted). */
void client_take(struct gw_client *cl, int64_t est, int64_t now_us);
/*
 * The request that reserved EST is over: USED tokens by its answer's
 * usage, or -1 when it got no answer (then the reservation is refunded).
 */
void client_settle(struct gw_client *cl, int64_t est, int64_t used, int64_t now_us, int64_t wall_s);
/* The tokens an answer used by its USAGE (enum token_kind, -1 unknown), or -1 when none is known. */
int64_t client_usage_total(enum dialect_id d, const int64_t *usage);

#endif
