/*
 * dispatch: queues, the choice of upstream, slots and leases, and the
 * feedback of attempt outcomes to breakers and limits (see dispatch.h).
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>

#include "dispatch.h"
#include "fleet.h"
#include "flight.h"
#include "gateway.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "request.h"
#include "route.h"
#include "sched.h"

/* What a candidate upstream must be. */
enum {
    C_USABLE = 1,      /* its circuit lets a request through */
    C_SLOT = 2,        /* below its concurrency limit */
    C_LEASE = 4,       /* in fleet mode: a lease is ready */
    C_UNTRIED = 8,     /* has not failed this request since the last backoff */
    C_WANTS_LEASE = 16 /* in fleet mode: has no lease ready */
};

/* Does U take the request's dialect (upstreams[].dialects)? */
static bool
speaks(const struct request *r, const struct gw_upstream *u)
{
    return (u->conf->dialects & DIALECT_BIT(r->dialect->id)) != 0;
}

static bool
eligible(const struct request *r, const struct gw_upstream *u)
{
    return speaks(r, u) && (!r->model || route_model_for(u->conf, r->model) != NULL);
}

/*
 * What an upstream must be for a request to go now: a cheap one (token
 * counting) needs no slot or lease, it never waits behind completions.
 */
static unsigned
go_need(const struct request *r)
{
    return r->cheap ? C_USABLE : C_USABLE | C_SLOT | C_LEASE;
}

/* Opened by failures that a retry may get past (not auth, not unreachable)? */
static bool
open_for_failures(const struct circuit *c)
{
    return c->state != CIRCUIT_CLOSED && !c->auth && strcmp(c->reason, "connect") != 0;
}

/*
 * A breaker never shuts a request's last way out: when no eligible
 * upstream's circuit lets the request through, those open for failures
 * (503, 429, timeouts, resets) take it anyway, as nginx never marks a sole
 * server down.  Retries and their backoff pace it; the first success
 * closes the circuit.  Open for 401/402/403 or for connect errors, they
 * do not (dispatch_auth_blocked, dispatch_unreachable).
 */
static bool
last_resort(const struct request *r, int64_t now)
{
    const struct gateway *gw = r->gw;

    for (size_t i = 0; i < gw->nups; i++) {
        struct gw_upstream *u = gw->ups[i];
        if (eligible(r, u) && circuit_usable(&u->circuit, now)) {
            return false;
        }
    }
    return true;
}

/*
 * The one filter over the upstreams: indexes of those that take the
 * request and meet NEED, in configuration order.  Returns how many.
 */
static size_t
candidates(const struct request *r, unsigned need, size_t out[ROUTE_MAX_UPSTREAMS])
{
    const struct gateway *gw = r->gw;
    int64_t now = http_now_us();
    bool fleet = fleet_active(gw->fleet);
    bool relaxed = (need & C_USABLE) && last_resort(r, now);
    size_t n = 0;

    for (size_t i = 0; i < gw->nups; i++) {
        struct gw_upstream *u = gw->ups[i];
        bool usable = relaxed ? circuit_usable(&u->circuit, now) || open_for_failures(&u->circuit)
                              : circuit_usable(&u->circuit, now);
        if (!eligible(r, u) || ((need & C_USABLE) && !usable) ||
            ((need & C_SLOT) && !sched_limit_available(&u->limit)) ||
            ((need & C_LEASE) && fleet && !fleet_lease_ready(u->fleet)) ||
            ((need & C_UNTRIED) && (r->tried & ((uint64_t)1 << i))) ||
            ((need & C_WANTS_LEASE) && (!u->fleet || fleet_lease_ready(u->fleet)))) {
            continue;
        }
        out[n++] = i;
    }
    return n;
}

bool
dispatch_dialect_served(const struct request *r)
{
    for (size_t i = 0; i < r->gw->nups; i++) {
        if (speaks(r, r->gw->ups[i])) {
            return true;
        }
    }
    return false;
}

bool
dispatch_any_eligible(const struct request *r)
{
    size_t c[ROUTE_MAX_UPSTREAMS];

    return candidates(r, 0, c) > 0;
}

struct gw_upstream *
dispatch_auth_blocked(const struct request *r)
{
    size_t c[ROUTE_MAX_UPSTREAMS];
    size_t n = candidates(r, 0, c);
    struct gw_upstream *answer = NULL;
    int64_t now = http_now_us();

    for (size_t i = 0; i < n; i++) {
        struct gw_upstream *u = r->gw->ups[c[i]];
        if (!u->circuit.auth || circuit_usable(&u->circuit, now)) {
            return NULL;
        }
        if (!answer && u->auth_body) {
            answer = u;
        }
    }
    return answer;
}

int64_t
dispatch_unreachable(const struct request *r)
{
    size_t c[ROUTE_MAX_UPSTREAMS];
    size_t n = candidates(r, 0, c);
    int64_t now = http_now_us(), soonest = -1;

    for (size_t i = 0; i < n; i++) {
        struct gw_upstream *u = r->gw->ups[c[i]];
        if (circuit_usable(&u->circuit, now) || open_for_failures(&u->circuit)) {
            return -1;
        }
        if (!u->circuit.auth) {
            int64_t ms = (u->circuit.open_until_us - now) / 1000;
            if (soonest < 0 || ms < soonest) {
                soonest = ms > 0 ? ms : 0;
            }
        }
    }
    return soonest;
}

bool
dispatch_alternative(struct request *r)
{
    size_t c[ROUTE_MAX_UPSTREAMS];

    r->tried |= (uint64_t)1 << r->att->up->idx;
    /* one that is full now would send the retry back to the one that failed it */
    return candidates(r, go_need(r) | C_UNTRIED, c) > 0;
}

void
dispatch_forget_tried(struct request *r)
{
    r->tried = 0;
}

/*
 * The upstream to use now, or NULL when every candidate is at its limit or
 * its circuit is open.  Untried upstreams first (a retry moves on).
 */
static struct gw_upstream *
pick_upstream(struct gateway *gw, struct request *r)
{
    size_t cand[ROUTE_MAX_UPSTREAMS], fresh[ROUTE_MAX_UPSTREAMS];
    size_t n = candidates(r, go_need(r), cand), nf = 0;
    int weights[ROUTE_MAX_UPSTREAMS];
    int64_t cur[ROUTE_MAX_UPSTREAMS];

    if (n == 0) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        if (!(r->tried & ((uint64_t)1 << cand[i]))) {
            fresh[nf++] = cand[i];
        }
    }
    const size_t *set = nf > 0 ? fresh : cand;
    size_t ns = nf > 0 ? nf : n;
    if (gw->conf->routing == ROUTING_FAILOVER || ns == 1) {
        return gw->ups[set[0]];
    }
    for (size_t i = 0; i < gw->nups; i++) {
        cur[i] = gw->ups[i]->swrr;
        weights[i] = gw->ups[i]->conf->weight;
    }
    size_t k = route_swrr_pick(cur, weights, set, ns);
    for (size_t i = 0; i < gw->nups; i++) {
        gw->ups[i]->swrr = cur[i];
    }
    return gw->ups[k];
}

/* In fleet mode: ask for leases for the upstreams the request could use. */
static void
want_leases(struct gateway *gw, struct request *r)
{
    size_t c[ROUTE_MAX_UPSTREAMS];
    size_t n = candidates(r, C_USABLE | C_SLOT | C_WANTS_LEASE, c);

    for (size_t i = 0; i < n; i++) {
        struct gw_upstream *u = gw->ups[c[i]];
        fleet_want(gw->fleet, u->fleet, u->conf->max_inflight, gw->queue.total);
    }
}

/* ---- clients: caps, quotas, fair share -------------------------------------------------- */

static int64_t
wall_s(void)
{
    return (int64_t)time(NULL);
}

static void
throttled(struct request *r, enum client_reason why)
{
    if (why != CLIENT_OK && !(r->throttled & (1u << why))) {
        r->throttled |= 1u << why;
        metrics_addf("dsgate_client_throttled_total", 1, "client=\"%s\",reason=\"%s\"",
                     r->client->name, client_reason_name[why]);
    }
}

/*
 * The client limit that keeps R from going upstream now (*WAIT_US: for
 * how long, -1 until a transfer of its client ends), or CLIENT_OK.  Once
 * its quotas are taken, only the in-flight cap applies (a retry).
 */
static enum client_reason
client_gate(struct request *r, int64_t now, int64_t *wait_us)
{
    struct gw_client *cl = r->client;

    *wait_us = 0;
    if (!cl || r->cheap) {
        return CLIENT_OK;
    }
    if (r->client_taken) {
        if (cl->max_inflight > 0 && cl->inflight >= cl->max_inflight) {
            *wait_us = -1;
            return CLIENT_MAX_INFLIGHT;
        }
        return CLIENT_OK;
    }
    return client_check(cl, r->est, now, wall_s(), wait_us);
}

static void
client_take_for(struct request *r, int64_t now)
{
    if (r->client && !r->cheap && !r->client_taken) {
        client_take(r->client, r->est, now);
        r->client_taken = true;
    }
}

enum client_reason
dispatch_client_admit(struct request *r, int64_t *wait_us)
{
    int64_t now = http_now_us();
    enum client_reason why = client_gate(r, now, wait_us);

    if (why == CLIENT_OK) {
        /* reserved now: N parallel requests see each other's reservations */
        client_take_for(r, now);
        return CLIENT_OK;
    }
    throttled(r, why);
    /* a spent daily budget would outlast any wait; over_limit: reject answers at once */
    return why == CLIENT_DAY || r->client->reject ? why : CLIENT_OK;
}

void
dispatch_client_settle(struct request *r)
{
    struct gw_client *cl = r->client;

    if (!cl || !r->client_taken) {
        return;
    }
    r->client_taken = false;
    int64_t used = client_usage_total(r->dialect->id, r->att->tokens);
    if (used < 0 && r->status == 200 && r->attempts > 0 && r->end != END_CACHE_HIT) {
        used = r->est; /* an answer whose usage is not known: what was reserved is spent */
    }
    client_settle(cl, r->est, used, http_now_us(), wall_s());
    for (int i = 0; i < TOK_KINDS && r->attempts > 0; i++) {
        if (r->att->tokens[i] < 0) {
            continue;
        }
        if (!cl->m_tokens[i]) {
            char labels[160];
            snprintf(labels, sizeof(labels), "client=\"%s\",kind=\"%s\"", cl->name,
                     token_kind_name[i]);
            cl->m_tokens[i] = metrics_series("dsgate_client_tokens_total", labels);
        }
        metrics_series_add(cl->m_tokens[i], (double)r->att->tokens[i]);
    }
}

/* The queue's view: is the flow (client) of this head held back by its limits? */
static bool
queue_blocked(const struct sched_item *it, void *arg)
{
    struct gateway *gw = arg;
    struct request *r = (struct request *)it; /* the item is its first member */
    int64_t wait_us;
    enum client_reason why = client_gate(r, http_now_us(), &wait_us);

    if (why == CLIENT_OK) {
        return false;
    }
    throttled(r, why);
    if (wait_us > 0 && (gw->client_wake_us == 0 || wait_us < gw->client_wake_us)) {
        gw->client_wake_us = wait_us;
    }
    return true;
}

/* A bucket will let a queued request go in client_wake_us: pump then. */
static void
client_wake_arm(struct gateway *gw)
{
    if (gw->client_wake_us > 0 && gw->client_wake) {
        int64_t us = gw->client_wake_us;
        struct timeval tv = {(time_t)(us / 1000000), (suseconds_t)(us % 1000000)};
        evtimer_add(gw->client_wake, &tv);
    }
    gw->client_wake_us = 0;
}

void
dispatch_client_wake_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    dispatch_pump(arg);
}

/* Do requests for the same upstreams (SIG) that are free to go wait already? */
static bool
queued_for(struct gateway *gw, uint64_t sig, int64_t now)
{
    int64_t aging = gw->conf->queue.aging_ms * 1000;

    for (unsigned i = 0; i < SCHED_GROUPS; i++) {
        if (gw->queue.g[i].used && (gw->queue.g[i].sig == sig || i == SCHED_GROUPS - 1) &&
            sched_queue_peek(&gw->queue.g[i].q, now, aging, queue_blocked, gw, NULL)) {
            return true; /* the shared overflow queue counts for every SIG */
        }
    }
    return false;
}

enum dispatch_result
dispatch_requeue(struct request *r, struct gw_upstream **up)
{
    return dispatch_requeue_at(r, up, http_now_us());
}

enum dispatch_result
dispatch_requeue_at(struct request *r, struct gw_upstream **up, int64_t t_enq_us)
{
    struct gateway *gw = r->gw;
    size_t c[ROUTE_MAX_UPSTREAMS];
    size_t n = candidates(r, 0, c);
    uint64_t sig = 0;

    int64_t now = http_now_us(), wait_us;

    for (size_t i = 0; i < n; i++) {
        sig |= (uint64_t)1 << c[i];
    }
    if (r->client && !r->item.tagged) {
        r->item.flow_key = r->client;
        sched_set_tag(&gw->queue, &r->item, r->prio, &r->client->finish[r->prio],
                      r->client->weight);
    }
    enum client_reason why = client_gate(r, now, &wait_us);
    if (r->cheap || (why == CLIENT_OK && (gw->queue.total == 0 || !queued_for(gw, sig, now)))) {
        *up = pick_upstream(gw, r);
        if (*up) {
            client_take_for(r, now);
            sched_set_served(&gw->queue, &r->item);
            metrics_observe("dsgate_queue_wait_seconds", NULL, 0);
            return DISPATCH_GO;
        }
    }
    if (why != CLIENT_OK) {
        throttled(r, why);
        if (wait_us > 0 && (gw->client_wake_us == 0 || wait_us < gw->client_wake_us)) {
            gw->client_wake_us = wait_us;
        }
        client_wake_arm(gw);
    } else {
        gw->client_wake_us = 0; /* what queued_for's look found, it finds again when it pumps */
    }
    sched_set_push_at(&gw->queue, &r->item, sig, r->prio, t_enq_us, now);
    if (r->client) {
        r->client->queued++;
    }
    if (fleet_active(gw->fleet)) {
        want_leases(gw, r);
    }
    return DISPATCH_QUEUED;
}

enum dispatch_result
dispatch_submit(struct request *r, struct gw_upstream **up)
{
    struct gateway *gw = r->gw;
    size_t c[ROUTE_MAX_UPSTREAMS];

    /* a full queue refuses, or sheds its newest lower-class request */
    if (!r->cheap && gw->queue.total >= (size_t)gw->conf->queue.max_queued &&
        !(gw->queue.total == 0 && candidates(r, C_USABLE | C_SLOT, c) > 0)) {
        struct sched_item *victim = sched_set_victim(&gw->queue, r->prio);
        if (!victim) {
            metrics_addf("dsgate_queue_rejected_total", 1, "reason=\"full\"");
            return DISPATCH_FULL;
        }
        struct request *v = (struct request *)victim; /* the item is its first member */
        dispatch_leave(v);
        metrics_addf("dsgate_queue_rejected_total", 1, "reason=\"displaced\"");
        gw->dispatch_ops->refuse(v, REFUSE_DISPLACED, NULL);
    }
    return dispatch_requeue(r, up);
}

void
dispatch_leave(struct request *r)
{
    if (!r->item.queued) {
        return;
    }
    sched_set_remove(&r->gw->queue, &r->item);
    if (r->client) {
        r->client->queued--;
    }
    int64_t waited = http_now_us() - r->item.t_in_us;
    r->queue_us += waited;
    metrics_observe("dsgate_queue_wait_seconds", NULL, (double)waited / 1e6);
}

/*
 * Held attempts of a lower class than HEAD on an upstream HEAD could use:
 * they only wait in the upstream's own queue, where HEAD would queue
 * behind them.  Taken back, they wait in ours instead.  True if any.
 */
static bool
shed_for(struct gateway *gw, struct request *head, enum prio p)
{
    int64_t now = http_now_us();
    bool any = false;

    for (struct request *v = gw->live, *next; v; v = next) {
        struct gw_upstream *u = v->att->up;
        next = v->lnext;
        if (v->state != REQ_ATTEMPT || !v->att->held || v->data_sent || v->racing || v->prio <= p ||
            flight_has_followers(v) || !eligible(head, u) || !circuit_usable(&u->circuit, now)) {
            continue;
        }
        gw->dispatch_ops->shed(v);
        any = true;
    }
    return any;
}

static void
shed_held(struct gateway *gw, int64_t now)
{
    struct sched_item *heads[SCHED_GROUPS];
    enum prio cls[SCHED_GROUPS];
    size_t n = sched_set_heads(&gw->queue, now, gw->conf->queue.aging_ms * 1000, queue_blocked,
                               gw, heads, cls);

    for (size_t i = 0; i < n && gw->held > 0; i++) {
        shed_for(gw, (struct request *)heads[i], cls[i]);
    }
}

void
dispatch_pump(struct gateway *gw)
{
    int64_t now = http_now_us();

    if (gw->held > 0 && gw->queue.total > 0) {
        shed_held(gw, now); /* their slots go to the waiting higher classes below */
    }
    for (;;) {
        struct sched_item *heads[SCHED_GROUPS];
        size_t n = sched_set_heads(&gw->queue, now, gw->conf->queue.aging_ms * 1000,
                                   queue_blocked, gw, heads, NULL);
        bool moved = false;
        for (size_t i = 0; i < n && !moved; i++) {
            struct request *r = (struct request *)heads[i];
            struct gw_upstream *up = pick_upstream(gw, r);
            struct gw_upstream *blocked = up ? NULL : dispatch_auth_blocked(r);
            if (up) {
                client_take_for(r, now);
                sched_set_served(&gw->queue, &r->item);
                dispatch_leave(r);
                gw->dispatch_ops->start(r, up);
                moved = true;
            } else if (blocked) {
                dispatch_leave(r);
                gw->dispatch_ops->refuse(r, REFUSE_AUTH, blocked);
                moved = true;
            } else if (dispatch_unreachable(r) >= 0) {
                dispatch_leave(r);
                gw->dispatch_ops->refuse(r, REFUSE_UNREACHABLE, NULL);
                moved = true;
            } else if (fleet_active(gw->fleet)) {
                want_leases(gw, r);
            }
        }
        if (!moved) {
            break;
        }
    }
    client_wake_arm(gw);
    fleet_trim(gw->fleet);
}

void
dispatch_acquire(struct request *r, struct gw_upstream *up)
{
    dispatch_acquire_at(r, r->att, up);
}

void
dispatch_acquire_at(struct request *r, struct attempt *a, struct gw_upstream *up)
{
    circuit_on_send(&up->circuit);
    if (r->cheap) {
        return; /* outside the concurrency limit */
    }
    sched_limit_acquire(&up->limit);
    if (r->client) {
        r->client->inflight++;
    }
    if (fleet_active(r->gw->fleet) && up->fleet) {
        a->lease = fleet_take(up->fleet);
    }
    a->slot_held = true;
}

struct gw_upstream *
dispatch_hedge_target(struct request *r)
{
    size_t c[ROUTE_MAX_UPSTREAMS];
    size_t n = candidates(r, go_need(r) | C_UNTRIED, c);

    for (size_t i = 0; i < n; i++) {
        if (r->gw->ups[c[i]] != r->att->up) {
            return r->gw->ups[c[i]]; /* the next eligible one, in order */
        }
    }
    return NULL;
}

void
dispatch_held(struct request *r)
{
    if (r->att->held || r->cheap) {
        return; /* a cheap request holds no slot that a higher class could have */
    }
    r->att->held = true;
    r->gw->held++;
    dispatch_limit(r, true); /* the upstream queues it: as good as a 503 */
    if (r->gw->queue.total > 0 && r->gw->later) {
        /* from the loop: this runs inside a transfer's callback, where no transfer may be cancelled */
        r->gw->pump_wanted = true;
        event_active(r->gw->later, EV_TIMEOUT, 0);
    }
}

static void
unheld(struct request *r, struct attempt *a)
{
    if (a->held) {
        a->held = false;
        r->gw->held--;
    }
}

void
dispatch_first_data(struct request *r, int64_t first_data_us)
{
    struct gw_upstream *u = r->att->up;
    bool was_held = r->att->held;

    unheld(r, r->att);
    if (r->att->limit_fed || r->cheap) {
        return;
    }
    r->att->limit_fed = true;
    /* a stream's first data byte is its first token; a non-stream one is the whole answer */
    bool queued = r->sse && !was_held && sched_limit_sample(&u->limit, first_data_us);
    if (!was_held) {
        dispatch_limit(r, queued);
    }
}

void
dispatch_release(struct request *r)
{
    dispatch_release_at(r, r->att);
}

void
dispatch_release_at(struct request *r, struct attempt *a)
{
    unheld(r, a);
    if (a->slot_held) {
        a->slot_held = false;
        sched_limit_release(&a->up->limit);
        struct gw_client *cl = r->client;
        if (cl && cl->inflight-- == cl->max_inflight && cl->queued > 0 && r->gw->later) {
            /* its queued requests may go now; from the loop, as this may run in a transfer's callback */
            r->gw->client_pump = true;
            event_active(r->gw->later, EV_TIMEOUT, 0);
        }
    }
    if (a->lease) {
        fleet_release(r->gw->fleet, a->up->fleet, a->lease);
        a->lease = NULL;
    }
}

void
dispatch_limit(struct request *r, bool overload)
{
    dispatch_limit_at(r, r->att, overload);
}

void
dispatch_limit_at(struct request *r, struct attempt *a, bool overload)
{
    struct gw_upstream *u = a->up;

    a->limit_fed = true;
    if (r->cheap) {
        return; /* not under the limit, so it says nothing about it */
    }
    bool cut = sched_limit_feedback(&u->limit, overload, http_now_us());

    if (u->fleet && (cut || !overload)) {
        /* the fleet hears a cut when this instance's window judged overload */
        fleet_feedback(r->gw->fleet, u->fleet, u->conf->max_inflight, cut);
    }
}

void
dispatch_circuit(struct request *r, enum route_outcome o, const char *reason)
{
    dispatch_circuit_at(r, r->att, o, reason);
}

void
dispatch_circuit_at(struct request *r, struct attempt *a, enum route_outcome o, const char *reason)
{
    struct gw_upstream *u = a->up;

    (void)r;
    int64_t now = http_now_us();

    if (!circuit_on_result(&u->circuit, o, reason, now)) {
        return;
    }
    const struct circuit *c = &u->circuit;
    if (c->state == CIRCUIT_OPEN) {
        int64_t ms = (c->open_until_us - now) / 1000;
        if (c->auth) {
            log_msg(LOG_WARN, "up=%s: circuit open for %lld ms: upstream answered %s (%s)",
                    u->conf->name, (long long)ms, reason,
                    strcmp(reason, "402") == 0   ? "insufficient balance"
                    : strcmp(reason, "401") == 0 ? "authentication failed, check the key"
                                                 : "forbidden");
        } else {
            log_msg(LOG_WARN, "up=%s: circuit open for %lld ms after %d failures (last: %s)",
                    u->conf->name, (long long)ms, c->failures, reason);
        }
        struct timeval tv = {ms / 1000, (ms % 1000) * 1000 + 1000};
        evtimer_add(u->wake, &tv);
    } else if (c->state == CIRCUIT_CLOSED) {
        log_msg(LOG_INFO, "up=%s: circuit closed", u->conf->name);
    }
}

void
dispatch_count(struct request *r, const char *outcome)
{
    dispatch_count_at(r, r->att, outcome);
}

void
dispatch_count_at(struct request *r, struct attempt *a, const char *outcome)
{
    struct gw_upstream *u = a->up;

    (void)r;
    for (size_t i = 0; i < u->n_m_attempts; i++) {
        if (strcmp(u->m_attempts[i].outcome, outcome) == 0) {
            metrics_series_add(u->m_attempts[i].s, 1);
            return;
        }
    }
    if (u->n_m_attempts < sizeof(u->m_attempts) / sizeof(u->m_attempts[0])) {
        char labels[160];
        snprintf(labels, sizeof(labels), "upstream=\"%s\",outcome=\"%s\"", u->conf->name,
                 outcome);
        u->m_attempts[u->n_m_attempts].outcome = outcome;
        u->m_attempts[u->n_m_attempts].s = metrics_series("dsgate_upstream_attempts_total", labels);
        metrics_series_add(u->m_attempts[u->n_m_attempts++].s, 1);
        return;
    }
    metrics_addf("dsgate_upstream_attempts_total", 1, "upstream=\"%s\",outcome=\"%s\"",
                 u->conf->name, outcome);
}

void
dispatch_update_gauges(struct gateway *gw)
{
    static const char *const pn[] = {"high", "medium", "low"};

    for (int p = 0; p < PRIO_COUNT; p++) {
        metrics_setf("dsgate_queue_depth", (double)gw->queue.depth[p], "priority=\"%s\"", pn[p]);
    }
    for (size_t i = 0; i < gw->clients.n; i++) {
        const struct gw_client *cl = gw->clients.v[i];
        metrics_setf("dsgate_client_inflight", cl->inflight, "client=\"%s\"", cl->name);
        metrics_setf("dsgate_client_queued", (double)cl->queued, "client=\"%s\"", cl->name);
        if (cl->tokens_per_day > 0) {
            int64_t left = cl->tokens_per_day - cl->tokens_today - cl->reserved;
            metrics_setf("dsgate_client_budget_remaining_tokens", (double)(left > 0 ? left : 0),
                         "client=\"%s\"", cl->name);
        }
    }
    for (size_t i = 0; i < gw->nups; i++) {
        const struct gw_upstream *u = gw->ups[i];
        metrics_setf("dsgate_inflight", u->limit.inflight, "upstream=\"%s\"", u->conf->name);
        metrics_setf("dsgate_concurrency_limit", sched_limit_current(&u->limit), "upstream=\"%s\"",
                     u->conf->name);
        metrics_setf("dsgate_circuit_open", u->circuit.state == CIRCUIT_OPEN ? 1 : 0,
                     "upstream=\"%s\"", u->conf->name);
        metrics_setf("dsgate_first_data_baseline_seconds", u->limit.baseline_us / 1e6,
                     "upstream=\"%s\"", u->conf->name);
        metrics_setf("dsgate_first_data_sample_seconds", (double)u->limit.sample_us / 1e6,
                     "upstream=\"%s\"", u->conf->name);
    }
}

void
dispatch_wake_cb(evutil_socket_t fd, short what, void *arg)
{
    struct gw_upstream *u = arg;

    (void)fd;
    (void)what;
    dispatch_pump(u->gw);
}
