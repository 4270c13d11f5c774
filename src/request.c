/*
 * request: the life of one proxied request, as one state machine.
 *
 *   request_start ── memory hit ─────────────────────────────────────────┐
 *        v                                                              │
 *       NEW ──> LOOKUP (Redis) ── hit ──────────────────────────────────┤
 *        │        │ miss                                                │
 *        v        v                                                     │
 *      restore ── remembered reasoning put back (compat.c; memory, or   │
 *        │        Redis in LOOKUP again)                                │
 *        v                                                              │
 *      route ── no upstream for dialect/model: 404; shut by auth: replay┤
 *        │   ── identical request in flight ──> FOLLOWING ── replayed ──┤
 *        │                                        │ the leader failed    │
 *        │                                        v before it started    │
 *        │                    route <──(loop)── PENDING                  │
 *        │   ── new flight, fleet mode ──> FLEET ── other's answer ──────┤
 *        │                                   │ lead here                 │
 *        v                                   v                           │
 *      admit ── queue full: 429 ────────────────────────────────────────┤
 *        │ slot free         QUEUED ── max_wait: 504; shed: 429;        │
 *        │                     │       all shut by auth: replay ────────┤
 *        v                     v slot                                    │
 *      ATTEMPT ── first data byte ──> STREAMING ── complete, or error ──┤
 *        │   ^   first_data deadline      │  idle deadline              │
 *        │   └──── BACKOFF <── retry ─────┘ (only before a data byte)   │
 *        └─ retry ───┘ (another upstream at once, or after a backoff)   v
 *                                                                     DONE ──(loop)──> freed
 *
 *   The client leaves in any state: its list or timer or transfer is left
 *   and the request is DONE; except a leader with followers, which goes on
 *   without a client ("headless") until its answer or its last follower's
 *   departure.
 *
 * One function changes state and arms the state's deadline (set_state).
 * One function decides what an attempt's outcome means (attempt_over),
 * from one table (rules[]).  Ending a request (request_end) answers,
 * logs and counts it and puts it on the reap list; one loop event frees
 * what is there, so nothing is freed inside a callback of something that
 * still uses it.
 */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "cache.h"
#include "compat.h"
#include "dispatch.h"
#include "fleet.h"
#include "flight.h"
#include "gateway.h"
#include "http.h"
#include "log.h"
#include "lookup.h"
#include "metrics.h"
#include "reply.h"
#include "request.h"
#include "retry.h"
#include "store.h"
#include "upstream.h"

#define STREAM_HIGH_WATER (256 * 1024) /* pause the upstream above this */

const char *const req_state_name[REQ_STATES] = {
    "new",     "lookup",  "fleet",   "following", "pending",
    "queued",  "backoff", "attempt", "streaming", "done",
};

static void request_end(struct request *r);
static void route(struct request *r);
static void hedge_promote(struct request *r);
static void hedge_count(const struct attempt *a, const char *outcome);
static void hedge_stop(struct request *r);
static struct attempt *other(struct request *r);

/* ---- states ------------------------------------------------------------------ */

static void
set_state(struct request *r, enum req_state to)
{
    const struct conf_upstream *uc = r->att->up ? r->att->up->conf : NULL;
    int64_t ms = 0;
    bool due_now = false; /* a deadline already passed runs from the loop */

    if (log_enabled(LOG_DEBUG) && r->state != to) {
        log_msg(LOG_DEBUG, "req=%llu: %s -> %s", (unsigned long long)r->id,
                req_state_name[r->state], req_state_name[to]);
    }
    r->state = to;
    switch (to) {
    case REQ_QUEUED:
        ms = conf_max_wait_ms(r->gw->conf, r->prio) - r->queue_us / 1000;
        due_now = true;
        break;
    case REQ_BACKOFF:
        ms = r->next_delay_ms;
        due_now = true;
        break;
    case REQ_ATTEMPT:
        ms = uc->first_data_ms;
        break;
    case REQ_STREAMING:
        ms = uc->idle_ms;
        break;
    default:
        break;
    }
    evtimer_del(r->timer);
    if (ms > 0) {
        struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
        evtimer_add(r->timer, &tv);
    } else if (due_now) {
        event_active(r->timer, EV_TIMEOUT, 0);
    }
}

bool
request_wanted(const struct request *r)
{
    return r->hreq || flight_has_followers(r);
}

/* ---- the retry decision -------------------------------------------------------- */

/* What each attempt outcome means: one table, read by attempt_over() only. */
static const struct outcome_rule rules[ATT_OUTCOMES] = {
    [ATT_OK] = {ROUTE_NEUTRAL, NULL, false, RS_NEVER, 0, NULL, NULL, END_COMPLETED},
    [ATT_DROPPED] = {ROUTE_NEUTRAL, NULL, false, RS_DECIDED, 0, NULL, NULL, END_NONE},
    [ATT_CONNECT] = {ROUTE_FAILURE, "connect", false, RS_ON_CONNECT, 502, "upstream_unreachable",
                     "upstream unreachable", END_UP_UNREACHABLE},
    [ATT_TIMEOUT] = {ROUTE_FAILURE, "timeout", true, RS_ON_TIMEOUT, 504, "upstream_timeout",
                     "upstream timed out", END_UP_TIMEOUT},
    [ATT_BROKEN] = {ROUTE_FAILURE, "broken", false, RS_ON_CONNECT, 502, "upstream_reset",
                    "upstream connection broke", END_UP_RESET},
    [ATT_LATE_STATUS] = {ROUTE_NEUTRAL, NULL, false, RS_NEVER, 502, "upstream_error", NULL,
                         END_UP_ERROR},
    [ATT_ABORTED] = {ROUTE_NEUTRAL, "", false, RS_NEVER, 0, NULL, NULL, END_CLIENT_CLOSED},
    [ATT_EMPTY] = {ROUTE_FAILURE, "closed", true, RS_ON_CONNECT, 502, "upstream_reset",
                   "upstream closed the answer before any data", END_UP_RESET},
    [ATT_FIRST_DATA] = {ROUTE_FAILURE, "timeout", true, RS_ON_TIMEOUT, 504, "upstream_timeout",
                        "upstream sent no data within timeouts.first_data", END_UP_TIMEOUT},
    [ATT_IDLE] = {ROUTE_FAILURE, "idle", true, RS_NEVER, 504, "upstream_idle_timeout",
                  "upstream stream idle beyond timeouts.idle", END_UP_IDLE},
    /* the upstream did answer (the request reached it): not a transport failure to retry */
    [ATT_INVALID] = {ROUTE_FAILURE, "invalid", false, RS_NEVER, 502, "upstream_invalid_response",
                     "upstream sent an invalid response", END_UP_ERROR},
};

const struct outcome_rule *
request_outcome_rule(enum attempt_outcome o)
{
    return (unsigned)o < ATT_OUTCOMES ? &rules[o] : NULL;
}

bool
request_outcome_retryable(const struct conf *c, enum attempt_outcome o, bool data_sent)
{
    const struct outcome_rule *rule = request_outcome_rule(o);

    if (!rule || data_sent) {
        return false;
    }
    switch (rule->retry) {
    case RS_NEVER:
        return false;
    case RS_DECIDED:
        return true;
    case RS_ON_CONNECT:
        return c->retry.on_connect;
    case RS_ON_TIMEOUT:
        return c->retry.on_timeout;
    }
    return false;
}

/*
 * May this request be tried again?  Decides the backoff too: the sleep
 * (or RETRY_AFTER_MS when the upstream asked for longer, capped by
 * retry.cap) must end before the request's deadline.  Takes from the retry
 * budget when the answer is yes.
 */
static bool
can_retry(struct request *r, int64_t retry_after_ms)
{
    const struct conf *c = r->gw->conf;
    int64_t now = http_now_us();

    if (r->data_sent || !request_wanted(r) || r->attempts - r->shed >= c->retry.max_attempts ||
        r->gw->draining) {
        return false;
    }
    /* another upstream that has not failed this request goes at once */
    bool move = dispatch_alternative(r);
    int64_t delay = 0;
    if (!move) {
        delay = retry_backoff_ms(c->retry.jitter, c->retry.base_ms, c->retry.cap_ms, r->backoffs,
                                 r->prev_delay_ms, retry_random);
        if (retry_after_ms > delay) {
            delay = retry_after_ms < c->retry.cap_ms ? retry_after_ms : c->retry.cap_ms;
        }
    }
    int64_t deadline = r->t_start_us + conf_max_wait_ms(c, r->prio) * 1000;
    if (now + delay * 1000 >= deadline) {
        return false;
    }
    if (!retry_budget_take(&r->gw->budget, now / 1000000, c->retry.budget)) {
        metrics_add("dsgate_retry_budget_exhausted_total", NULL, 1);
        return false;
    }
    r->next_delay_ms = delay;
    r->moving = move;
    return true;
}

static void
schedule_retry(struct request *r, const char *reason)
{
    metrics_addf("dsgate_retries_total", 1, "upstream=\"%s\",reason=\"%s\"",
                 r->att->up->conf->name, reason);
    log_msg(LOG_DEBUG, "req=%llu up=%s: retry %d in %lld ms (%s)", (unsigned long long)r->id,
            r->att->up->conf->name, r->attempts, (long long)r->next_delay_ms, reason);
    if (!r->moving) {
        /* every candidate failed: back off, then all may be tried again */
        r->prev_delay_ms = r->next_delay_ms;
        r->backoffs++;
        dispatch_forget_tried(r);
    }
    r->status = 0;
    set_state(r, REQ_BACKOFF);
}

/*
 * A 200 that ended before any data byte on a completion path: DeepSeek
 * closes a held request so (the head and keep-alives, then nothing).
 */
static bool
closed_before_data(const struct request *r, const struct attempt_result *res)
{
    /* kept alive first (keep-alives seen, or dsgate's own head): a plain empty 200 is passed on */
    bool held = r->att->held || r->att->held_told || r->early;
    return res->outcome == ATT_OK && res->status == 200 && !r->data_sent && r->cache_path &&
           held && (r->sse || res->head_pending || r->early);
}

/* An attempt is over: count it, then retry, answer or fail, by rules[]. */
static void
attempt_over(struct request *r, const struct attempt_result *in)
{
    struct gateway *gw = r->gw;
    struct attempt_result resv = *in, *res = &resv;

    if (closed_before_data(r, res)) {
        res->outcome = ATT_EMPTY;
    }
    const struct outcome_rule *rule = &rules[res->outcome];
    int status = res->outcome == ATT_LATE_STATUS ? r->late_status : res->status;

    assert(r->state == REQ_ATTEMPT || r->state == REQ_STREAMING);
    dispatch_release(r);
    if (!r->att->limit_fed && res->outcome == ATT_OK) {
        dispatch_limit(r, false); /* a whole answer without a data byte (empty, or not 200) */
    }
    dispatch_count(r, attempt_outcome_label(res->outcome, status));
    if (rule->circuit_reason) {
        dispatch_circuit(r, rule->circuit, rule->circuit_reason);
    }
    if (rule->overload) {
        dispatch_limit(r, true);
    }
    if (rule->circuit == ROUTE_FAILURE && res->detail) {
        log_msg(LOG_WARN, "req=%llu up=%s: upstream %s: %s", (unsigned long long)r->id,
                r->att->up->conf->name, rule->circuit_reason, res->detail);
    }
    if (r->racing && res->outcome != ATT_ABORTED) {
        hedge_promote(r); /* the hedge still runs: it is the way on, not a retry */
        return;
    }
    if (res->outcome == ATT_DROPPED ||
        (request_outcome_retryable(gw->conf, res->outcome, r->data_sent) && can_retry(r, 0))) {
        schedule_retry(r, res->outcome == ATT_DROPPED ? r->retry_reason : rule->circuit_reason);
        dispatch_pump(gw);
        return;
    }
    switch (res->outcome) {
    case ATT_OK:
        r->end = END_COMPLETED;
        if (res->head_pending) {
            attempt_send_head(r->att); /* an empty body, passed on as it is */
        }
        if (r->hreq && !http_reply_started(r->hreq)) {
            /* curl saw a complete answer whose head we never passed on */
            reply_fail(r, 502, "upstream_reset", "upstream answer had no head", END_UP_RESET);
        } else if (r->hreq) {
            http_reply_end(r->hreq, false);
            r->hreq = NULL;
        }
        break;
    case ATT_ABORTED:
        if (!r->end) {
            r->end = END_CLIENT_CLOSED;
        }
        break;
    case ATT_LATE_STATUS:
        reply_late_error(r, status, res->body, res->body_len);
        break;
    default:
        reply_fail(r, rule->status, rule->code, rule->message, rule->end);
        break;
    }
    request_end(r);
    dispatch_pump(gw);
}

/* ---- attempt ops -------------------------------------------------------------- */

/*
 * Is an upstream STATUS retried?  retry.on lists it, or it is the
 * dialect's busy status (Anthropic's 529) and retry.on lists 503.
 */
static bool
retry_on(const struct request *r, int status)
{
    const struct conf *c = r->gw->conf;

    return retry_on_status(c, status) ||
           (dialect_busy(r->dialect, status) && retry_on_status(c, 503));
}

/* The line a cut attempt left half-sent is ended, so the next event stands alone. */
static void
end_cut_line(struct request *r)
{
    if (r->sse && r->hreq && (r->scan.mid_line || r->scan.mid_event)) {
        const char *end = r->scan.mid_line ? "\n\n" : "\n";
        sse_scan_feed(&r->scan, end, strlen(end));
        http_reply_data(r->hreq, end, strlen(end));
    }
}

static enum attempt_head
cur_head(struct request *r, const struct attempt_head_info *h)
{
    int status = h->status;
    char reason[8];

    assert(r->state == REQ_ATTEMPT || r->state == REQ_STREAMING);
    if (!request_wanted(r)) {
        return AH_GONE;
    }
    if (status != 200) {
        dispatch_limit(r, status == 429 || status == 503 || status == 504 ||
                              dialect_busy(r->dialect, status));
    } /* a 200 is judged at its first data byte (dispatch_first_data) */
    r->status = status;
    enum route_outcome oc = route_classify_status(status);
    if (oc == ROUTE_AUTH_FAILURE && !r->att->up->auth_header) {
        /* the client's own key: its problem, never the upstream's circuit, never replayed */
        oc = ROUTE_NEUTRAL;
    }
    snprintf(reason, sizeof(reason), "%d", status);
    dispatch_circuit(r, oc, reason);
    if (oc == ROUTE_AUTH_FAILURE && dispatch_alternative(r) && can_retry(r, 0)) {
        /* the account is at fault here: another upstream may still serve */
        r->retry_reason = "auth";
        return AH_DROP;
    }
    if (retry_on(r, status) && can_retry(r, h->retry_after_ms)) {
        snprintf(r->retry_status, sizeof(r->retry_status), "%d", status);
        r->retry_reason = r->retry_status;
        return AH_DROP;
    }
    if (r->replied && status != 200) {
        /* the answer started (keep-alives): the error goes in the reply */
        r->late_status = status;
        return AH_LATE;
    }
    if (!r->replied) {
        r->sse = h->sse;
        sse_scan_init(&r->scan, r->sse);
    }
    flight_head(r, status, h->ctype);
    if (!request_wanted(r)) {
        return AH_GONE; /* a leader without a client whose flight could not be shared */
    }
    if (!r->replied) {
        return AH_TAKE;
    }
    /* an earlier attempt or dsgate itself sent the head: the body continues that reply */
    end_cut_line(r);
    return AH_CONTINUE;
}

static void
cur_start(struct request *r, int status, struct http_header *h, size_t n, int64_t clen)
{
    struct reply_buf rb;
    struct reply_info ri = {
        .attempts = r->attempts,
        .queue_ms = r->queue_us / 1000,
        .upstream = r->att->up->conf->name,
        .cache = r->cacheable ? (r->store_ok ? "MISS" : "BYPASS") : NULL,
        .client = REPLY_CLIENT(r),
    };

    r->replied = true;
    if (r->hreq) {
        n += reply_headers(h + n, &ri, &rb);
        http_reply_start(r->hreq, status, h, n, clen);
    }
}

static int
cur_data(struct request *r, const char *p, size_t len)
{
    if (!request_wanted(r)) {
        return UP_ABORT;
    }
    if (!r->replied && r->hreq) {
        /* a hedge that took over before its data: its head was never passed on */
        r->want_sse = r->hedge_sse;
        reply_early_head(r);
    }
    bool mid_event = r->scan.mid_event;
    if (sse_scan_feed(&r->scan, p, len)) {
        int64_t now = http_now_us();
        if (r->racing) {
            /* the request's own attempt won: the hedge is stopped from the loop */
            r->racing = false;
            hedge_count(other(r), "lost");
            event_active(r->hedge_kill, EV_TIMEOUT, 0);
        }
        if (r->t_first_data_us == 0) {
            r->t_first_data_us = now;
        }
        if (r->state == REQ_ATTEMPT) {
            dispatch_first_data(r, now - r->att->t_start_us);
        }
        r->data_sent = true;
        set_state(r, REQ_STREAMING); /* the idle deadline from now */
    } else if (!r->data_sent && r->sse) {
        dispatch_held(r); /* keep-alive comments before data: the upstream queues it */
    } else if (r->sse && r->state == REQ_STREAMING && (mid_event || r->scan.mid_event)) {
        set_state(r, REQ_STREAMING); /* an event's bytes are flowing: not idle */
    }
    if (r->compat) {
        compat_answer_feed(r->compat, r->sse, p, len);
    }
    if (r->flight) {
        flight_append(r, p, len);
        if (!r->hreq && !r->flight) {
            return UP_ABORT; /* too large to share; nobody else wants it */
        }
    }
    if (r->hreq) {
        http_reply_data(r->hreq, p, len);
        r->bytes_out += len;
    }
    return UP_CONTINUE;
}

/* ---- hedging ---------------------------------------------------------------------- */

static struct attempt *
other(struct request *r)
{
    return r->att == &r->atts[0] ? &r->atts[1] : &r->atts[0];
}

static void
hedge_count(const struct attempt *a, const char *outcome)
{
    metrics_addf("dsgate_hedges_total", 1, "upstream=\"%s\",outcome=\"%s\"", a->up->conf->name,
                 outcome);
}

/* The attempt that is not the request's own: stop it (from the loop) and give its slot back. */
static void
hedge_stop(struct request *r)
{
    struct attempt *o = other(r);

    if (attempt_running(o)) {
        attempt_cancel(o);
        dispatch_count_at(r, o, "lost_race");
        dispatch_circuit_at(r, o, ROUTE_NEUTRAL, ""); /* a probe nobody waits for says nothing */
    }
    dispatch_release_at(r, o);
}

static void
hedge_kill_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    hedge_stop(arg);
}

/* Attempt A (the hedge) produced the first data byte: it is the request's attempt now. */
static void
hedge_win(struct request *r, struct attempt *a)
{
    r->racing = false;
    r->tried |= (uint64_t)1 << r->att->up->idx; /* the one that lost is not tried again at once */
    /* it had no data byte within hedge_after and lost: its limit hears a slow first token */
    dispatch_limit_at(r, r->att, true);
    r->att = a;
    r->status = 200; /* also for a leader without a client: its flight is stored on success */
    hedge_count(a, "won");
    event_active(r->hedge_kill, EV_TIMEOUT, 0); /* the other one, from the loop */
    if (!r->replied && r->hreq) {
        r->want_sse = r->hedge_sse;
        reply_early_head(r);
    }
    end_cut_line(r);
    flight_head(r, 200, r->hedge_ctype);
}

static enum attempt_head
hedge_head(struct request *r, const struct attempt_head_info *h)
{
    if (!r->racing || h->status != 200) {
        return AH_GONE; /* lost already, or failed: the request's own attempt goes on */
    }
    r->hedge_sse = h->sse;
    r->hedge_headed = true;
    snprintf(r->hedge_ctype, sizeof(r->hedge_ctype), "%s", h->ctype ? h->ctype : "");
    sse_scan_init(&r->hscan, h->sse);
    return AH_CONTINUE; /* its head goes out only if it wins */
}

static int
hedge_data(struct request *r, struct attempt *a, const char *p, size_t len)
{
    if (!r->racing) {
        return UP_ABORT;
    }
    if (!sse_scan_feed(&r->hscan, p, len)) {
        return UP_CONTINUE; /* keep-alives of the hedge are not passed on */
    }
    hedge_win(r, a);
    return cur_data(r, p, len);
}

/* The hedge ended before it won: the request's own attempt goes on alone. */
static void
hedge_done(struct request *r, struct attempt *a, const struct attempt_result *res)
{
    dispatch_count_at(r, a, res->outcome == ATT_ABORTED ? "lost_race"
                                                         : attempt_outcome_label(res->outcome,
                                                                                 res->status));
    if (res->outcome == ATT_ABORTED) {
        dispatch_circuit_at(r, a, ROUTE_NEUTRAL, "");
    }
    dispatch_release_at(r, a);
    if (r->racing) {
        r->racing = false;
        hedge_count(a, "cancelled");
    }
}

/* The request's attempt ended while a hedge runs: the hedge is the attempt now. */
static void
hedge_promote(struct request *r)
{
    r->racing = false;
    r->tried |= (uint64_t)1 << r->att->up->idx; /* it failed this request */
    r->att = other(r);
    hedge_count(r->att, "won");
    if (r->hedge_headed) {
        /* its 200 head came while racing: the answer is the hedge's from now */
        r->status = 200;
        if (!r->replied) {
            r->sse = r->hedge_sse;
            sse_scan_init(&r->scan, r->sse);
        }
        flight_head(r, 200, r->hedge_ctype);
    }
    set_state(r, REQ_ATTEMPT); /* the hedge's upstream's first_data deadline */
}

static void
fill_spec(const struct request *r, struct attempt_spec *spec)
{
    *spec = (struct attempt_spec){
        .method = r->method,
        .target = r->target,
        .body = r->body,
        .body_len = r->body_len,
        .model = r->model,
        .model_off = r->model_off,
        .model_len = r->model_len,
        .ch = &r->ch,
        .dialect = r->dialect,
        .count_usage = r->cache_path || (r->client && (r->client->tpm || r->client->tokens_per_day)),
    };
}

static const struct attempt_ops slot_ops[2];

/* timeouts.hedge_after without a data byte: the same request on the next eligible upstream too. */
static void
hedge_cb(evutil_socket_t fd, short what, void *arg)
{
    struct request *r = arg;
    struct gateway *gw = r->gw;
    struct attempt_spec spec;

    (void)fd;
    (void)what;
    if (r->state != REQ_ATTEMPT || r->racing || !attempt_running(r->att) || !request_wanted(r) ||
        gw->draining || r->attempts - r->shed >= gw->conf->retry.max_attempts) {
        return;
    }
    struct gw_upstream *up = dispatch_hedge_target(r);
    if (!up) {
        return;
    }
    if (!retry_budget_take(&gw->budget, http_now_us() / 1000000, gw->conf->retry.budget)) {
        metrics_add("dsgate_retry_budget_exhausted_total", NULL, 1);
        return;
    }
    struct attempt *h = other(r);
    fill_spec(r, &spec);
    if (attempt_start(h, gw->up, up, &spec, &slot_ops[h - r->atts], r) < 0) {
        return;
    }
    h->t_start_us = http_now_us();
    h->limit_fed = true; /* the limit hears the attempt that counts */
    dispatch_acquire_at(r, h, up);
    r->attempts++;
    r->racing = true;
    r->hedge_headed = false;
    log_msg(LOG_DEBUG, "req=%llu up=%s: hedged on %s", (unsigned long long)r->id,
            r->att->up->conf->name, up->conf->name);
}

/* ---- attempt ops, one table per attempt slot ------------------------------------------ */

static enum attempt_head
slot_head(struct request *r, struct attempt *a, const struct attempt_head_info *h)
{
    return a == r->att ? cur_head(r, h) : hedge_head(r, h);
}

static void
slot_held(struct request *r, struct attempt *a)
{
    if (a == r->att && !r->data_sent) {
        dispatch_held(r);
    }
}

static bool
slot_blocked(struct request *r, struct attempt *a)
{
    (void)a;
    return r->hreq && http_reply_pending(r->hreq) > STREAM_HIGH_WATER;
}

static void
slot_start(struct request *r, struct attempt *a, int status, struct http_header *h, size_t n,
           int64_t clen)
{
    if (a == r->att) {
        cur_start(r, status, h, n, clen);
    }
}

static int
slot_data(struct request *r, struct attempt *a, const char *p, size_t len)
{
    return a == r->att ? cur_data(r, p, len) : hedge_data(r, a, p, len);
}

static void
slot_done(struct request *r, struct attempt *a, const struct attempt_result *res)
{
    if (a == r->att) {
        attempt_over(r, res);
    } else {
        hedge_done(r, a, res);
    }
}

#define SLOT_OPS(i)                                                                                \
    static enum attempt_head head##i(void *o, const struct attempt_head_info *h)                  \
    {                                                                                              \
        return slot_head(o, &((struct request *)o)->atts[i], h);                                   \
    }                                                                                              \
    static void held##i(void *o)                                                                   \
    {                                                                                              \
        slot_held(o, &((struct request *)o)->atts[i]);                                             \
    }                                                                                              \
    static bool blocked##i(void *o)                                                                \
    {                                                                                              \
        return slot_blocked(o, &((struct request *)o)->atts[i]);                                   \
    }                                                                                              \
    static void start##i(void *o, int st, struct http_header *h, size_t n, int64_t clen)          \
    {                                                                                              \
        slot_start(o, &((struct request *)o)->atts[i], st, h, n, clen);                            \
    }                                                                                              \
    static int data##i(void *o, const char *p, size_t len)                                         \
    {                                                                                              \
        return slot_data(o, &((struct request *)o)->atts[i], p, len);                              \
    }                                                                                              \
    static void done##i(void *o, const struct attempt_result *res)                                 \
    {                                                                                              \
        slot_done(o, &((struct request *)o)->atts[i], res);                                        \
    }
SLOT_OPS(0)
SLOT_OPS(1)

static const struct attempt_ops slot_ops[2] = {
    {head0, held0, blocked0, start0, data0, done0},
    {head1, held1, blocked1, start1, data1, done1},
};

/* ---- on the way upstream --------------------------------------------------------- */

static void
start_attempt(struct request *r, struct gw_upstream *up)
{
    struct gateway *gw = r->gw;
    int64_t now = http_now_us();
    struct attempt_spec spec;

    if (r->attempts == 0) {
        retry_budget_first(&gw->budget, now / 1000000);
    }
    fill_spec(r, &spec);
    r->attempts++;
    r->t_up_start_us = now;
    r->att->limit_fed = false;
    if (attempt_start(r->att, gw->up, up, &spec, &slot_ops[r->att - r->atts], r) < 0) {
        reply_fail(r, 502, "upstream_unreachable", "cannot start upstream transfer", END_INTERNAL);
        request_end(r);
        return;
    }
    r->att->t_start_us = now;
    dispatch_acquire(r, up);
    set_state(r, REQ_ATTEMPT);
    int64_t ms = up->conf->hedge_after_ms;
    if (ms > 0 && (r->hedge || (r->hedge = evtimer_new(gw->base, hedge_cb, r))) &&
        (r->hedge_kill || (r->hedge_kill = event_new(gw->base, -1, 0, hedge_kill_cb, r)))) {
        struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
        evtimer_add(r->hedge, &tv);
    }
}

/* Into the queue, unless it is full: then refuse (a lower class may be shed). */
static void
admit(struct request *r)
{
    struct gw_upstream *up;
    int64_t wait_us;
    enum client_reason why = dispatch_client_admit(r, &wait_us);

    if (why != CLIENT_OK) {
        reply_client_limited(r, why, wait_us);
        request_end(r);
        return;
    }
    switch (dispatch_submit(r, &up)) {
    case DISPATCH_GO:
        start_attempt(r, up);
        break;
    case DISPATCH_QUEUED:
        set_state(r, REQ_QUEUED);
        break;
    case DISPATCH_FULL:
        reply_fail(r, 429, "queue_full", "too many requests waiting; retry later", END_QUEUE_FULL);
        request_end(r);
        break;
    }
}

/* Refused by the model or the circuits, shared with an identical request, or admitted. */
static void
route(struct request *r)
{
    assert(r->state == REQ_NEW || r->state == REQ_LOOKUP || r->state == REQ_PENDING);
    set_state(r, REQ_NEW);
    if (!r->hreq) {
        request_end(r);
        return;
    }
    if (!dispatch_dialect_served(r)) {
        reply_no_dialect(r);
        request_end(r);
        return;
    }
    if (!dispatch_any_eligible(r)) {
        reply_unknown_model(r);
        request_end(r);
        return;
    }
    struct gw_upstream *blocked = dispatch_auth_blocked(r);
    if (blocked) {
        reply_auth(r, blocked);
        request_end(r);
        return;
    }
    int64_t unreachable_ms = dispatch_unreachable(r);
    if (unreachable_ms >= 0) {
        reply_unreachable(r, unreachable_ms); /* fast and honest, not a wait for max_wait */
        request_end(r);
        return;
    }
    if (r->cacheable && r->store_ok) {
        switch (flight_enter(r)) {
        case FLIGHT_FOLLOW:
            set_state(r, REQ_FOLLOWING);
            flight_feed(r);
            return;
        case FLIGHT_FLEET:
            set_state(r, REQ_FLEET);
            return;
        case FLIGHT_LEAD:
        case FLIGHT_NONE:
            break;
        }
    }
    admit(r);
}

/* Back to the way upstream after a backoff or a shed: at once, or queued at T_ENQ_US's place. */
static void
requeue(struct request *r, int64_t t_enq_us)
{
    struct gw_upstream *up;

    if (dispatch_requeue_at(r, &up, t_enq_us) == DISPATCH_GO) {
        start_attempt(r, up);
    } else {
        set_state(r, REQ_QUEUED);
    }
}

static void
timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct request *r = arg;
    struct attempt_result res = {.status = r->att->status};

    (void)fd;
    (void)what;
    switch (r->state) {
    case REQ_QUEUED:
        dispatch_leave(r);
        reply_fail(r, 504, "queue_timeout", "request waited longer than queue.max_wait",
             END_QUEUE_TIMEOUT);
        request_end(r);
        return;
    case REQ_BACKOFF:
        requeue(r, http_now_us());
        return;
    case REQ_ATTEMPT:
    case REQ_STREAMING:
        /* an upstream deadline */
        res.outcome = r->state == REQ_ATTEMPT ? ATT_FIRST_DATA : ATT_IDLE;
        attempt_cancel(r->att);
        attempt_over(r, &res);
        return;
    default:
        return; /* no deadline in this state */
    }
}

/* ---- dsgate's own keep-alives ------------------------------------------------------- */

/*
 * keepalive.after without a reply head (queued, backing off, held
 * upstream): dsgate sends the 200 head itself, then a keep-alive every
 * keepalive.every until data flows, so clients' read timeouts do not fire.
 */
static void
keepalive_cb(evutil_socket_t fd, short what, void *arg)
{
    struct request *r = arg;
    const struct conf *c = r->gw->conf;
    const char *sse_ka = r->dialect->sse_keepalive;

    (void)fd;
    (void)what;
    if (r->state == REQ_DONE || !r->hreq || r->data_sent) {
        return;
    }
    if (!r->replied) {
        reply_early_head(r);
        attempt_head_out(r->att); /* a head held for the first data byte will not go */
    }
    if (!r->sse) {
        sse_scan_feed(&r->scan, "\n", 1);
        http_reply_data(r->hreq, "\n", 1);
    } else if (!r->scan.mid_line && !r->scan.mid_event) {
        sse_scan_feed(&r->scan, sse_ka, strlen(sse_ka));
        http_reply_data(r->hreq, sse_ka, strlen(sse_ka));
    }
    struct timeval tv = {c->keepalive.every_ms / 1000, (c->keepalive.every_ms % 1000) * 1000};
    evtimer_add(r->ka, &tv);
}

static void
keepalive_arm(struct request *r)
{
    const struct conf *c = r->gw->conf;

    if (c->keepalive.after_ms <= 0 || !r->cache_path || strcmp(r->method, "POST") != 0) {
        return; /* completion requests only: elsewhere a 200 head would be a guess */
    }
    r->ka = evtimer_new(r->gw->base, keepalive_cb, r);
    if (r->ka) {
        struct timeval tv = {c->keepalive.after_ms / 1000, (c->keepalive.after_ms % 1000) * 1000};
        evtimer_add(r->ka, &tv);
    }
}

/* ---- dispatch and flight ops ------------------------------------------------------ */

static void
on_dispatch_start(struct request *r, struct gw_upstream *up)
{
    assert(r->state == REQ_QUEUED);
    start_attempt(r, up);
}

static void
on_dispatch_refuse(struct request *r, enum dispatch_refusal why, struct gw_upstream *u)
{
    assert(r->state == REQ_QUEUED);
    if (why == REFUSE_AUTH) {
        reply_auth(r, u);
    } else if (why == REFUSE_UNREACHABLE) {
        reply_unreachable(r, dispatch_unreachable(r));
    } else {
        reply_fail(r, 429, "queue_full", "displaced by a higher-priority request; retry later",
             END_QUEUE_DISPLACED);
    }
    request_end(r);
}

/* Taken back while its upstream holds it: wait in our queue, by class, instead. */
static void
on_dispatch_shed(struct request *r)
{
    assert(r->state == REQ_ATTEMPT);
    attempt_cancel(r->att);
    dispatch_count(r, "shed");
    dispatch_circuit(r, ROUTE_NEUTRAL, "");
    dispatch_release(r);
    r->shed++;
    r->status = 0;
    requeue(r, r->t_start_us); /* its place, by arrival */
}

static const struct dispatch_ops dispatch_ops = {on_dispatch_start, on_dispatch_refuse,
                                                 on_dispatch_shed};

static void
on_follower_end(struct request *r, bool ok)
{
    assert(r->state == REQ_FOLLOWING);
    if (ok) {
        r->end = END_COALESCED;
    } else {
        reply_fail(r, 502, "upstream_reset", "upstream failed while serving an identical request",
             END_COALESCED_FAILED);
    }
    if (r->hreq) {
        http_reply_end(r->hreq, false);
        r->hreq = NULL;
    }
    request_end(r);
}

static void
on_follower_free(struct request *r)
{
    struct gateway *gw = r->gw;

    assert(r->state == REQ_FOLLOWING);
    set_state(r, REQ_PENDING);
    r->later = gw->pending;
    gw->pending = r;
    event_active(gw->later, EV_TIMEOUT, 0);
}

static void
on_flight_go(struct request *r)
{
    assert(r->state == REQ_FLEET);
    admit(r);
}

static void
on_flight_hit(struct request *r, struct cache_entry *e)
{
    assert(r->state == REQ_FLEET);
    reply_cached(r, e, "redis");
    request_end(r);
}

static const struct flight_ops flight_ops = {on_follower_end, on_follower_free, on_flight_go,
                                             on_flight_hit};

/* ---- the client ------------------------------------------------------------------- */

enum req_end
request_left_end(enum req_state state, bool data_sent)
{
    switch (state) {
    case REQ_QUEUED:
        return END_CLIENT_QUEUED;
    case REQ_BACKOFF:
        return END_CLIENT_BACKOFF;
    case REQ_STREAMING:
    case REQ_FOLLOWING:
        return data_sent ? END_CLIENT_STREAMING : END_CLIENT_WAITING;
    default:
        return END_CLIENT_WAITING;
    }
}

static void
on_client_close(void *arg)
{
    struct request *r = arg;
    struct gateway *gw = r->gw;
    bool freed_slot = r->att->slot_held;

    assert(r->state != REQ_DONE);
    r->hreq = NULL;
    if (flight_has_followers(r)) {
        /* identical requests wait on this one: go on without a client */
        attempt_resume(r->att);
        return;
    }
    if (!r->end) {
        r->end = request_left_end(r->state, r->data_sent);
    }
    if (attempt_running(r->att)) {
        attempt_cancel(r->att);
        dispatch_count(r, "client_closed");
        dispatch_circuit(r, ROUTE_NEUTRAL, "");
    }
    struct request *orphan = flight_follower_gone(r);
    request_end(r);
    if (orphan) {
        orphan->end = END_CLIENT_WAITING;
        request_end(orphan);
        freed_slot = true;
    }
    if (freed_slot) {
        dispatch_pump(gw);
    }
}

static void
on_client_drain(void *arg)
{
    struct request *r = arg;

    if (r->state == REQ_FOLLOWING) {
        flight_feed(r);
    } else {
        attempt_resume(r->att); /* may deliver data right here */
    }
}

/* ---- life --------------------------------------------------------------------------- */

static void
pending_remove(struct request *r)
{
    struct request **pp = &r->gw->pending;

    while (*pp && *pp != r) {
        pp = &(*pp)->later;
    }
    if (*pp) {
        *pp = r->later;
    }
    r->later = NULL;
}

static void
access_record(const struct request *r)
{
    struct access_rec a = {
        .id = r->id,
        .method = r->method,
        .path = r->path,
        .status = r->status,
        .prio = r->prio,
        .cache = r->cache_status,
        .upstream = r->attempts && r->att->up ? r->att->up->conf->name : "",
        .attempts = r->attempts,
        .queue_ms = r->queue_us / 1000,
        .upstream_ms = r->t_up_start_us ? (http_now_us() - r->t_up_start_us) / 1000 : 0,
        .first_data_ms = r->t_first_data_us ? (r->t_first_data_us - r->t_start_us) / 1000 : -1,
        .t_start_us = r->t_start_us,
        .bytes_in = r->bytes_in,
        .reasoning_restored = compat_restored(r->compat),
        .bytes_out = r->bytes_out,
        .tokens = r->att->tokens,
        .client = r->client ? r->client->name : NULL,
        .end = r->end,
    };
    access_note(&a);
}

static void
request_ref(struct request *r)
{
    r->refs++;
}

/* Free at the last reference: only the reaper drops the last one. */
static void
request_unref(struct request *r)
{
    if (--r->refs > 0) {
        return;
    }
    assert(r->state == REQ_DONE);
    attempt_free(&r->atts[0]);
    attempt_free(&r->atts[1]);
    if (r->timer) {
        event_free(r->timer);
    }
    if (r->ka) {
        event_free(r->ka);
    }
    if (r->hedge) {
        event_free(r->hedge);
    }
    if (r->hedge_kill) {
        event_free(r->hedge_kill);
    }
    client_headers_free(&r->ch);
    client_unref(r->client);
    compat_req_free(r->compat);
    free(r->body);
    free(r->path);
    free(r->target);
    free(r->model);
    free(r);
}

/*
 * The request is over: leave whatever list or wait it is in, end the
 * reply if it is still open, log and count it, and put it on the reap
 * list.  Runs once; the memory stays valid until the reaper runs.
 */
static void
request_end(struct request *r)
{
    struct gateway *gw = r->gw;

    if (r->state == REQ_DONE) {
        return;
    }
    dispatch_leave(r);
    if (r->state == REQ_PENDING) {
        pending_remove(r);
    }
    if (r->sget) {
        store_get_cancel(r->sget);
        r->sget = NULL;
    }
    if (r->fwait) {
        fleet_wait_cancel(r->fwait);
        r->fwait = NULL;
    }
    set_state(r, REQ_DONE);
    if (r->ka) {
        evtimer_del(r->ka);
    }
    if (r->hedge) {
        evtimer_del(r->hedge);
        event_del(r->hedge_kill);
    }
    if (r->racing) {
        r->racing = false;
        hedge_count(other(r), "cancelled");
    }
    hedge_stop(r);
    flight_leave(r, r->status == 200 && r->end == END_COMPLETED);
    if (r->compat) {
        compat_cancel(r->compat);
        if (r->status == 200 && r->end == END_COMPLETED) {
            compat_answer_done(r->compat, gw->store);
        }
    }
    if (attempt_running(r->att)) {
        attempt_cancel(r->att);
        dispatch_circuit(r, ROUTE_NEUTRAL, ""); /* a probe nobody waits for says nothing */
    }
    if (r->hreq) {
        /* should not happen: every path ends the reply before ending */
        http_reply_end(r->hreq, true);
        r->hreq = NULL;
    }
    dispatch_release(r);
    dispatch_client_settle(r);
    access_record(r);
    gw->live_requests--;
    if (r->lprev) {
        r->lprev->lnext = r->lnext;
    } else {
        gw->live = r->lnext;
    }
    if (r->lnext) {
        r->lnext->lprev = r->lprev;
    }
    r->lprev = r->lnext = NULL;
    r->later = gw->reap;
    gw->reap = r;
    event_active(gw->later, EV_TIMEOUT, 0);
}

/* Free the ended requests (their last reference is the reap list's). */
static void
reap(struct gateway *gw)
{
    while (gw->reap) {
        struct request *r = gw->reap;
        gw->reap = r->later;
        request_unref(r);
    }
}

/*
 * From the loop: requests let go by a flight are dispatched, a pump asked
 * for inside a transfer's callback runs, then ended requests are freed.
 */
static void
later_cb(evutil_socket_t fd, short what, void *arg)
{
    struct gateway *gw = arg;

    (void)fd;
    (void)what;
    while (gw->pending) {
        struct request *r = gw->pending;
        gw->pending = r->later;
        r->later = NULL;
        route(r);
    }
    if (gw->client_pump) {
        gw->client_pump = false;
        dispatch_pump(gw);
    }
    reap(gw);
}

/* A request object for HREQ, counted and linked; NULL when out of memory (answered). */
static struct request *
request_new(struct gateway *gw, struct http_req *hreq, enum prio prio)
{
    struct request *r = calloc(1, sizeof(*r));

    if (!r || !(r->timer = evtimer_new(gw->base, timer_cb, r))) {
        free(r);
        http_reply_error(hreq, 500, "internal_error", "out_of_memory", "out of memory");
        return NULL;
    }
    request_ref(r); /* the request's own, dropped by the reaper */
    r->att = &r->atts[0];
    attempt_init(&r->atts[0]);
    attempt_init(&r->atts[1]);
    r->state = REQ_NEW;
    r->gw = gw;
    r->hreq = hreq;
    r->id = hreq->id;
    r->prio = prio;
    r->t_start_us = hreq->t_start_us;
    r->cache_status = CS_NONE;
    snprintf(r->method, sizeof(r->method), "%s", hreq->method);
    r->dialect = dialect_of_path(hreq->path);
    r->cheap = r->dialect->cheap(hreq->path);
    r->path = strdup(hreq->path);
    r->target = strdup(hreq->target);
    gw->live_requests++;
    r->lnext = gw->live;
    if (gw->live) {
        gw->live->lprev = r;
    }
    gw->live = r;
    if (!r->path || !r->target) {
        reply_fail(r, 500, "out_of_memory", "out of memory", END_INTERNAL);
        request_end(r);
        return NULL;
    }
    return r;
}

/* ---- remembered reasoning (compat.reasoning_content) ------------------------------ */

/*
 * What the request may get back and whether its answer is read: on an
 * OpenAI chat path, within the client's cache scope.  The cache key was
 * made from the client's bytes before this (identical client requests
 * share an entry, whatever is put back).
 */
static void
restore_prepare(struct request *r, const struct http_req *hreq)
{
    char *cred;

    if (compat_wanted(r->gw->compat, r->path) && lookup_scope(r->gw, hreq, &cred) == 0) {
        r->compat = compat_req_new(r->gw->compat, cred, r->body, r->body_len);
        free(cred);
    }
}

static void
restore_done(struct request *r)
{
    compat_apply(r->compat, &r->body, &r->body_len, &r->model_off);
    route(r);
}

static void
on_restore_found(void *arg)
{
    struct request *r = arg;

    assert(r->state == REQ_LOOKUP);
    restore_done(r);
}

/* On the way upstream: what is remembered goes back into the body (from Redis: LOOKUP). */
static void
restore(struct request *r)
{
    if (!r->compat) {
        route(r);
    } else if (compat_fetch(r->compat, r->gw->store, on_restore_found, r)) {
        set_state(r, REQ_LOOKUP);
    } else {
        restore_done(r);
    }
}

static void
on_store_reply(void *arg, struct cache_entry *e)
{
    struct request *r = arg;

    assert(r->state == REQ_LOOKUP);
    r->sget = NULL;
    if (e) {
        if (r->gw->conf->cache.max_entries > 0) {
            cache_mem_put(r->gw->mem, e); /* promote */
        }
        reply_cached(r, e, "redis");
        request_end(r);
        return;
    }
    metrics_add("dsgate_cache_misses_total", NULL, 1);
    restore(r);
}

void
request_start(struct gateway *gw, struct http_req *hreq, enum prio prio, bool cache_path,
              const struct request_body_info *bi)
{
    struct request *r = request_new(gw, hreq, prio);

    if (!r) {
        return;
    }
    http_req_set_callbacks(hreq, on_client_close, on_client_drain, r);
    r->cache_path = cache_path;
    if (cache_path && gw->conf->cache.enabled) {
        lookup_prepare(r, hreq, bi->doc, bi->known_key, bi->raw_key);
    }
    if (client_headers_copy(&r->ch, hreq, r->cacheable) < 0) {
        reply_fail(r, 500, "out_of_memory", "out of memory", END_INTERNAL);
        request_end(r);
        return;
    }
    r->want_sse = cache_path && lookup_wants_stream(bi->doc, hreq->body, hreq->body_len);
    r->body = http_req_take_body(hreq, &r->body_len);
    r->bytes_in = r->body_len;
    if (bi->client) {
        r->client = bi->client;
        client_ref(r->client);
        r->est = client_estimate(r->client, r->body, r->body_len);
    }
    keepalive_arm(r);
    if (bi->model) {
        r->model = strdup(bi->model); /* no routing by model if this fails */
        r->model_off = bi->model_off;
        r->model_len = bi->model_len;
    }
    restore_prepare(r, hreq);
    if (r->lookup) {
        struct cache_entry *e = cache_mem_get(gw->mem, r->key, cache_now_ms());
        if (e) {
            reply_cached(r, e, "memory");
            request_end(r);
            return;
        }
        r->sget = store_get(gw->store, r->key, on_store_reply, r);
        if (r->sget) {
            set_state(r, REQ_LOOKUP);
            return;
        }
        metrics_add("dsgate_cache_misses_total", NULL, 1);
    }
    restore(r);
}

int
request_setup(struct gateway *gw)
{
    gw->dispatch_ops = &dispatch_ops;
    gw->flights = flight_table_new(&flight_ops);
    gw->later = event_new(gw->base, -1, 0, later_cb, gw);
    gw->client_wake = evtimer_new(gw->base, dispatch_client_wake_cb, gw);
    return gw->flights && gw->later && gw->client_wake ? 0 : -1;
}

void
request_teardown(struct gateway *gw)
{
    if (gw->later) {
        later_cb(-1, 0, gw); /* free what is ended */
        event_free(gw->later);
        gw->later = NULL;
    }
    if (gw->client_wake) {
        event_free(gw->client_wake);
        gw->client_wake = NULL;
    }
    flight_table_free(gw->flights);
    gw->flights = NULL;
}

void
request_shutdown(struct gateway *gw)
{
    gw->draining = true;
    while (gw->live) {
        struct request *r = gw->live;
        if (attempt_running(r->att)) {
            attempt_cancel(r->att);
        }
        reply_fail(r, 503, "shutting_down", "dsgate is shutting down; retry", END_SHUTDOWN);
        request_end(r);
    }
    reap(gw);
}
