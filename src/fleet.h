/*
 * fleet: many dsgate instances sharing one upstream account through Redis.
 *
 * Leases: with fleet.redis set, `upstreams[].max_inflight` is the limit of
 * the whole fleet.  Before a request goes upstream its instance holds a
 * lease: a member of the sorted set dsgate:fleet:lease:<upstream> whose
 * score is its expiry.  One Lua script takes free leases atomically (expired
 * ones are dropped first), so a dead instance's leases lapse after
 * fleet.lease_ttl; live instances renew theirs every lease_ttl / 3.  The
 * local queue decides who gets a granted lease, so priorities and
 * deadlines hold fleet-wide.  Releases are published so that waiting
 * instances ask again at once.
 *
 * Shared adaptive limit: when any instance's window of outcomes judges the
 * upstream overloaded (sched.h), it cuts dsgate:fleet:limit:<upstream>
 * (x0.7, at most once per 200 ms fleet-wide);
 * successes raise it by 1/limit each, sent once a second.  Leases are only
 * granted below that limit, so the fleet backs off and recovers together.
 *
 * Fleet-wide coalescing: the leader of a cacheable request claims
 * dsgate:fleet:inflight:<key> (SET NX).  An instance that finds it claimed
 * waits for "done <key>" on the fleet channel (at most fleet.lease_ttl),
 * then reads the shared cache; "fail <key>", a miss or the timeout let it
 * go upstream itself.  Answers are shared through cache.redis.
 *
 * Redis unreachable: each instance falls back to max_inflight /
 * fleet.fallback_instances locally, logs it and shows
 * dsgate_fleet_fallback 1; no request fails because Redis is down.
 */
#ifndef DSGATE_FLEET_H
#define DSGATE_FLEET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache.h"

struct event_base;
struct fleet;
struct fleet_up;
struct fleet_wait;

/*
 * What the fleet tells its owner (the gateway): it never calls the
 * request machinery by name.
 */
struct fleet_hooks {
    /* Leases were granted or freed elsewhere: queued requests may go. */
    void (*capacity)(void *arg);
    /* Fleet mode went into or out of fallback: local caps change, then capacity. */
    void (*mode)(void *arg);
    /* How many requests wait locally (0: granted leases may be given back). */
    size_t (*waiting)(void *arg);
    void *arg;
};

/* NULL when the URL is unusable (logged).  HOOKS is copied. */
struct fleet *fleet_new(struct event_base *base, const struct fleet_hooks *hooks, const char *url,
                        int64_t lease_ttl_ms, int fallback_instances);
/* Settings that a reload may change. */
void fleet_configure(struct fleet *f, int64_t lease_ttl_ms, int fallback_instances);
/* Release granted leases when nothing waits any more (after a pump). */
void fleet_trim(struct fleet *f);
void fleet_free(struct fleet *f);

/* Leases are in force (Redis reachable); false: local fallback limits. */
bool fleet_active(const struct fleet *f);
/* The fleet state of upstream NAME (created on first use; lives with F). */
struct fleet_up *fleet_up_get(struct fleet *f, const char *name);
/* Local concurrency cap for an upstream whose fleet-wide limit is MAX. */
int fleet_local_max(const struct fleet *f, int max_inflight);

/*
 * A lease granted and not yet used?  fleet_take() hands one out; it stays
 * the fleet's until fleet_release().
 */
bool fleet_lease_ready(const struct fleet_up *fu);
char *fleet_take(struct fleet_up *fu);
/* Ask for up to WANT more leases (one request in flight per upstream at a time). */
void fleet_want(struct fleet *f, struct fleet_up *fu, int max_inflight, size_t want);
/* The transfer that held LEASE (from fleet_take) ended. */
void fleet_release(struct fleet *f, struct fleet_up *fu, char *lease);
/* Adaptive signal: OVERLOAD true when this instance's window judged overload, false for a success.
 */
void fleet_feedback(struct fleet *f, struct fleet_up *fu, int max_inflight, bool overload);

/*
 * Coalescing.  fleet_claim() asks whether this instance leads KEY; FN runs
 * once, later, with LEAD true (go upstream) or false (another instance is
 * on it: FN runs again from fleet_wait with DONE true when its answer is in
 * the shared cache, false when it failed or the wait timed out).  Returns
 * NULL when the fleet cannot be asked (then lead).
 */
typedef void (*fleet_claim_fn)(void *arg, bool lead);
typedef void (*fleet_done_fn)(void *arg, bool done);
struct fleet_wait *fleet_claim(struct fleet *f, const uint8_t key[CACHE_KEY_LEN], int64_t ttl_ms,
                               fleet_claim_fn fn, void *arg);
void fleet_wait(struct fleet_wait *w, int64_t timeout_ms, fleet_done_fn fn);
/* Forget a claim or a wait: no callback runs afterwards. */
void fleet_wait_cancel(struct fleet_wait *w);
/* The leader is done: OK true when its answer is in the shared cache. */
void fleet_finish(struct fleet *f, const uint8_t key[CACHE_KEY_LEN], bool ok);

#endif
