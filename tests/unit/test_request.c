/*
 * Unit tests for the request state machine's pure parts and for the two
 * modules it drives through ops tables, with fake ops recording the calls:
 *
 *   request.c   the outcome table (request_outcome_rule), the retry decision
 *               per outcome x retry.on_connect/on_timeout x data sent x
 *               reply head sent (request_outcome_retryable), the end of a
 *               request whose client left, per state (request_left_end);
 *   dispatch.c  a hand-built struct gateway (1-3 upstreams, no fleet):
 *               admission (at once, queued, shedding a lower class, full),
 *               the queue in class order, routing by model, failover and
 *               weighted choice, every upstream shut by 401/402/403, the
 *               untried alternative after a failure, the breaker and
 *               attempt counters, the gauges;
 *   flight.c    coalescing with fake flight_ops: lead and follow, the ways a
 *               flight dissolves (a non-200 head, the leader failing, too
 *               large), a good answer stored in the memory tier, and a
 *               follower's client leaving a headless leader.
 *
 * Followers here have no client (hreq NULL): feed() then does nothing, so
 * replay and ops.follower_end are not reached; that needs a real
 * http_req (the integration tests).  Most tests are tables.  Run from the
 * repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <event2/event.h>

#include "access.h"
#include "attempt.h"
#include "cache.h"
#include "conf.h"
#include "dispatch.h"
#include "flight.h"
#include "gateway.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "request.h"
#include "route.h"
#include "sched.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))
#define H        PRIO_HIGH
#define M        PRIO_MEDIUM
#define L        PRIO_LOW

static const char *const outcome_names[ATT_OUTCOMES] = {
    "ATT_OK",          "ATT_DROPPED", "ATT_CONNECT",    "ATT_TIMEOUT", "ATT_BROKEN",
    "ATT_LATE_STATUS", "ATT_ABORTED", "ATT_EMPTY",      "ATT_FIRST_DATA", "ATT_IDLE",
    "ATT_INVALID",
};

/* ---- the retry decision: every outcome x every switch ---------------------------- */

/*
 * Expected request_outcome_retryable(), one string per outcome, one
 * character per combination; position = on_connect*4 + on_timeout*2 +
 * data_sent.  Read in pairs: data_sent = 0 1, for (on_connect, on_timeout)
 * = 00, 01, 10, 11.  A reply head that went out (an SSE head, keep-alives)
 * does not matter: the next attempt's events continue the same reply.
 */
static const struct {
    enum attempt_outcome o;
    const char *want;
    const char *why;
} retry_table[] = {
    /* clang-format off */
    /*                    oc=0 ot=0  oc=0 ot=1  oc=1 ot=0  oc=1 ot=1 */
    {ATT_OK,          "00" "00" "00" "00", "a complete answer: never"},
    {ATT_DROPPED,     "10" "10" "10" "10", "its head asked for it: unless data went out"},
    {ATT_CONNECT,     "00" "00" "10" "10", "on_connect, before data"},
    {ATT_TIMEOUT,     "00" "10" "00" "10", "on_timeout, before data"},
    {ATT_BROKEN,      "00" "00" "10" "10", "on_connect, before data (after an SSE head too)"},
    {ATT_LATE_STATUS, "00" "00" "00" "00", "never"},
    {ATT_ABORTED,     "00" "00" "00" "00", "nobody wants it: never"},
    {ATT_EMPTY,       "00" "00" "10" "10", "held, then closed: on_connect, before data"},
    {ATT_FIRST_DATA,  "00" "10" "00" "10", "on_timeout, before data"},
    {ATT_IDLE,        "00" "00" "00" "00", "data flowed already: never"},
    {ATT_INVALID,     "00" "00" "00" "00", "the upstream answered (invalidly): never"},
    /* clang-format on */
};

static void
test_retryable_table(void **state)
{
    bool seen[ATT_OUTCOMES] = {false};

    (void)state;
    assert_int_equal(NELEM(retry_table), ATT_OUTCOMES);
    for (size_t i = 0; i < NELEM(retry_table); i++) {
        enum attempt_outcome o = retry_table[i].o;
        assert_true((unsigned)o < ATT_OUTCOMES);
        assert_false(seen[o]);
        seen[o] = true;
        assert_int_equal(strlen(retry_table[i].want), 8);
        for (int k = 0; k < 8; k++) {
            struct conf c;
            memset(&c, 0, sizeof(c));
            c.retry.on_connect = (k >> 2) & 1;
            c.retry.on_timeout = (k >> 1) & 1;
            bool data_sent = k & 1;
            bool got = request_outcome_retryable(&c, o, data_sent);
            bool want = retry_table[i].want[k] == '1';
            if (got != want) {
                fail_msg("%s (%s): on_connect=%d on_timeout=%d data_sent=%d: "
                         "retryable=%d, want %d",
                         outcome_names[o], retry_table[i].why, c.retry.on_connect,
                         c.retry.on_timeout, data_sent, got, want);
            }
        }
    }
}

/* Out of range: no rule, never retried. */
static void
test_retryable_out_of_range(void **state)
{
    struct conf c;

    (void)state;
    memset(&c, 0, sizeof(c));
    c.retry.on_connect = c.retry.on_timeout = true;
    assert_null(request_outcome_rule(ATT_OUTCOMES));
    assert_null(request_outcome_rule((enum attempt_outcome)(-1)));
    assert_false(request_outcome_retryable(&c, ATT_OUTCOMES, false));
}

/* ---- the outcome table ------------------------------------------------------------ */

static const struct {
    enum attempt_outcome o;
    enum route_outcome circuit;
    bool has_reason; /* circuit_reason != NULL: dispatch_circuit runs */
    bool overload;
    enum retry_switch retry;
    int status;   /* 0: not a failure the client is told about by the rule */
    bool message; /* a fixed message (LATE_STATUS builds its own) */
    enum req_end end;
} rule_table[] = {
    {ATT_OK, ROUTE_NEUTRAL, false, false, RS_NEVER, 0, false, END_COMPLETED},
    {ATT_DROPPED, ROUTE_NEUTRAL, false, false, RS_DECIDED, 0, false, END_NONE},
    {ATT_CONNECT, ROUTE_FAILURE, true, false, RS_ON_CONNECT, 502, true, END_UP_UNREACHABLE},
    {ATT_TIMEOUT, ROUTE_FAILURE, true, true, RS_ON_TIMEOUT, 504, true, END_UP_TIMEOUT},
    {ATT_BROKEN, ROUTE_FAILURE, true, false, RS_ON_CONNECT, 502, true, END_UP_RESET},
    {ATT_LATE_STATUS, ROUTE_NEUTRAL, false, false, RS_NEVER, 502, false, END_UP_ERROR},
    {ATT_ABORTED, ROUTE_NEUTRAL, true, false, RS_NEVER, 0, false, END_CLIENT_CLOSED},
    {ATT_EMPTY, ROUTE_FAILURE, true, true, RS_ON_CONNECT, 502, true, END_UP_RESET},
    {ATT_FIRST_DATA, ROUTE_FAILURE, true, true, RS_ON_TIMEOUT, 504, true, END_UP_TIMEOUT},
    {ATT_IDLE, ROUTE_FAILURE, true, true, RS_NEVER, 504, true, END_UP_IDLE},
    {ATT_INVALID, ROUTE_FAILURE, true, false, RS_NEVER, 502, true, END_UP_ERROR},
};

static void
test_outcome_rules(void **state)
{
    (void)state;
    assert_int_equal(NELEM(rule_table), ATT_OUTCOMES);
    for (size_t i = 0; i < NELEM(rule_table); i++) {
        const struct outcome_rule *r = request_outcome_rule(rule_table[i].o);
        const char *n = outcome_names[rule_table[i].o];
        if (!r) {
            fail_msg("%s: no rule", n);
        }
        if (r->circuit != rule_table[i].circuit ||
            (r->circuit_reason != NULL) != rule_table[i].has_reason ||
            r->overload != rule_table[i].overload || r->retry != rule_table[i].retry ||
            r->status != rule_table[i].status || (r->message != NULL) != rule_table[i].message ||
            r->end != rule_table[i].end) {
            fail_msg("%s: rule {circuit %d reason %s overload %d retry %d status %d message %s "
                     "end %d} differs from the table",
                     n, r->circuit, r->circuit_reason ? r->circuit_reason : "NULL", r->overload,
                     r->retry, r->status, r->message ? "set" : "NULL", r->end);
        }
        /* a failure the client is told about has all it needs */
        if (r->status) {
            if (r->status < 400 || r->status > 599 || !r->code || !*r->code || r->end == END_NONE ||
                r->end == END_COMPLETED) {
                fail_msg("%s: failing rule without status/code/end", n);
            }
        }
        /* a failure the breaker counts names its reason */
        if (r->circuit == ROUTE_FAILURE && (!r->circuit_reason || !*r->circuit_reason)) {
            fail_msg("%s: ROUTE_FAILURE without a reason", n);
        }
        /* an outcome that is retried by a switch is one the breaker hears as a failure */
        if ((r->retry == RS_ON_CONNECT || r->retry == RS_ON_TIMEOUT) &&
            r->circuit != ROUTE_FAILURE) {
            fail_msg("%s: retried by a switch but not a failure", n);
        }
        if ((unsigned)r->end >= END_COUNT) {
            fail_msg("%s: end %d out of range", n, r->end);
        }
    }
}

/* Every end has a label; labels are distinct except END_NONE and END_COMPLETED. */
static void
test_end_labels(void **state)
{
    (void)state;
    assert_string_equal(req_end_info[END_NONE].label, req_end_info[END_COMPLETED].label);
    for (int e = 0; e < END_COUNT; e++) {
        const char *l = req_end_info[e].label;
        if (!l || !*l) {
            fail_msg("end %d has no label", e);
        }
        for (int k = 0; k < e; k++) {
            if (k == END_NONE && e == END_COMPLETED) {
                continue;
            }
            if (strcmp(req_end_info[k].label, l) == 0) {
                fail_msg("ends %d and %d share the label \"%s\"", k, e, l);
            }
        }
    }
    /* the ends of the rules say who ended it: the upstream, or the client */
    for (int o = 0; o < ATT_OUTCOMES; o++) {
        const struct outcome_rule *r = request_outcome_rule((enum attempt_outcome)o);
        if (r->status && req_end_info[r->end].who != WHO_UPSTREAM) {
            fail_msg("%s: end \"%s\" is not the upstream's", outcome_names[o],
                     req_end_info[r->end].label);
        }
    }
    assert_int_equal(req_end_info[END_CLIENT_CLOSED].who, WHO_CLIENT);
}

/* ---- the end of a request whose client left ------------------------------------- */

static void
test_left_end(void **state)
{
    static const struct {
        enum req_state s;
        enum req_end no_data, data;
    } t[] = {
        {REQ_NEW, END_CLIENT_WAITING, END_CLIENT_WAITING},
        {REQ_LOOKUP, END_CLIENT_WAITING, END_CLIENT_WAITING},
        {REQ_FLEET, END_CLIENT_WAITING, END_CLIENT_WAITING},
        /* a follower whose replay already sent data left while streaming */
        {REQ_FOLLOWING, END_CLIENT_WAITING, END_CLIENT_STREAMING},
        {REQ_PENDING, END_CLIENT_WAITING, END_CLIENT_WAITING},
        {REQ_QUEUED, END_CLIENT_QUEUED, END_CLIENT_QUEUED},
        {REQ_BACKOFF, END_CLIENT_BACKOFF, END_CLIENT_BACKOFF},
        {REQ_ATTEMPT, END_CLIENT_WAITING, END_CLIENT_WAITING},
        {REQ_STREAMING, END_CLIENT_WAITING, END_CLIENT_STREAMING},
        {REQ_DONE, END_CLIENT_WAITING, END_CLIENT_WAITING}, /* not called: asserted */
    };

    (void)state;
    assert_int_equal(NELEM(t), REQ_STATES);
    for (size_t i = 0; i < NELEM(t); i++) {
        assert_int_equal(t[i].s, (enum req_state)i);
        for (int ds = 0; ds <= 1; ds++) {
            enum req_end got = request_left_end(t[i].s, ds);
            enum req_end want = ds ? t[i].data : t[i].no_data;
            if (got != want) {
                fail_msg("state %s, data_sent %d: end \"%s\", want \"%s\"", req_state_name[i], ds,
                         req_end_info[got].label, req_end_info[want].label);
            }
            if (req_end_info[got].who != WHO_CLIENT) {
                fail_msg("state %s: end \"%s\" is not the client's", req_state_name[i],
                         req_end_info[got].label);
            }
        }
        assert_non_null(req_state_name[i]);
    }
}

/* ---- a hand-built gateway --------------------------------------------------------- */

#define MAX_UPS   3
#define MAX_REQS  64
#define MAX_CALLS 64

struct up_spec {
    const char *name;
    int max_inflight;      /* 0: 1 */
    int weight;            /* 0: 1 */
    const char *models[3]; /* none: takes any model */
    unsigned dialects;     /* DIALECT_BIT()s; 0: all */
};

struct gw_spec {
    size_t nups;
    struct up_spec ups[MAX_UPS];
    int64_t max_queued; /* -1: 0 */
    enum routing routing;
    bool flights;
    int64_t mem_entries; /* memory tier; 0: off (gw->mem still made) */
};

struct fx {
    struct event_base *base;
    struct conf conf;
    struct conf_upstream uc[MAX_UPS];
    struct conf_model cm[MAX_UPS][3];
    struct gw_upstream *up[MAX_UPS];
    struct gateway gw;
    struct request *reqs[MAX_REQS];
    size_t nreqs;
    bool built;
};

/* What the fake ops were told, in order. */
enum call_kind { C_START, C_REFUSE, C_SHED, C_FOLLOWER_END, C_FOLLOWER_FREE, C_GO, C_HIT };

struct call {
    enum call_kind kind;
    struct request *r;
    struct gw_upstream *up;
    enum dispatch_refusal why;
    bool ok;
};

static struct call calls[MAX_CALLS];
static size_t ncalls;

static void
record(enum call_kind k, struct request *r, struct gw_upstream *up, enum dispatch_refusal why,
       bool ok)
{
    assert_true(ncalls < MAX_CALLS);
    calls[ncalls++] = (struct call){k, r, up, why, ok};
}

/* Like request.c's start_attempt: the slot is taken (no transfer here). */
static void
fake_start(struct request *r, struct gw_upstream *up)
{
    assert_false(r->item.queued); /* it left the queue first */
    record(C_START, r, up, REFUSE_DISPLACED, false);
    r->att->up = up;
    dispatch_acquire(r, up);
}

static void
fake_refuse(struct request *r, enum dispatch_refusal why, struct gw_upstream *u)
{
    assert_false(r->item.queued);
    record(C_REFUSE, r, u, why, false);
}

/* Like request.c's on_dispatch_shed: the attempt ends and the request waits again. */
static void
fake_shed(struct request *r)
{
    struct gw_upstream *up = NULL;

    record(C_SHED, r, r->att->up, REFUSE_DISPLACED, false);
    dispatch_release(r);
    r->state = REQ_QUEUED;
    assert_int_equal(dispatch_requeue(r, &up), DISPATCH_QUEUED);
}

static const struct dispatch_ops fake_dispatch_ops = {fake_start, fake_refuse, fake_shed};

static void
fake_follower_end(struct request *r, bool ok)
{
    record(C_FOLLOWER_END, r, NULL, REFUSE_DISPLACED, ok);
}

static void
fake_follower_free(struct request *r)
{
    assert_null(r->flight); /* unlinked before it is let go */
    record(C_FOLLOWER_FREE, r, NULL, REFUSE_DISPLACED, false);
}

static void
fake_go(struct request *r)
{
    record(C_GO, r, NULL, REFUSE_DISPLACED, false);
}

static void
fake_hit(struct request *r, struct cache_entry *e)
{
    record(C_HIT, r, NULL, REFUSE_DISPLACED, false);
    cache_entry_unref(e);
}

static const struct flight_ops fake_flight_ops = {fake_follower_end, fake_follower_free, fake_go,
                                                  fake_hit};

static int
fx_setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    ncalls = 0;
    metrics_init();
    *state = f;
    return 0;
}

static void
fx_build(struct fx *f, const struct gw_spec *s)
{
    struct gateway *gw = &f->gw;

    assert_true(s->nups >= 1 && s->nups <= MAX_UPS);
    f->base = event_base_new();
    assert_non_null(f->base);
    f->conf.upstreams = f->uc;
    f->conf.nupstreams = s->nups;
    f->conf.routing = s->routing;
    f->conf.queue.max_queued = s->max_queued < 0 ? 0 : s->max_queued;
    f->conf.queue.max_wait_ms = 60000;
    f->conf.queue.aging_ms = 0; /* class order only */
    f->conf.queue.default_priority = PRIO_MEDIUM;
    f->conf.retry.max_attempts = 3;
    f->conf.retry.on_connect = f->conf.retry.on_timeout = true;
    f->conf.cache.enabled = true;
    f->conf.cache.ttl_ms = 60000;
    f->conf.cache.max_entries = s->mem_entries;
    f->conf.cache.max_bytes = 1 << 20;
    for (size_t i = 0; i < s->nups; i++) {
        struct conf_upstream *uc = &f->uc[i];
        uc->name = (char *)s->ups[i].name;
        uc->url = (char *)"http://127.0.0.1:1";
        uc->api_key_env = (char *)"";
        uc->max_inflight = s->ups[i].max_inflight ? s->ups[i].max_inflight : 1;
        uc->weight = s->ups[i].weight ? s->ups[i].weight : 1;
        uc->connect_ms = 1000;
        uc->dialects = s->ups[i].dialects ? s->ups[i].dialects : DIALECT_ALL;
        uc->models = f->cm[i];
        for (size_t k = 0; k < 3 && s->ups[i].models[k]; k++) {
            f->cm[i][k].from = f->cm[i][k].to = (char *)s->ups[i].models[k];
            uc->nmodels++;
        }
        struct gw_upstream *u = calloc(1, sizeof(*u));
        assert_non_null(u);
        u->refs = 1;
        u->conf = uc;
        u->idx = i;
        sched_limit_init(&u->limit, uc->max_inflight, false);
        circuit_init(&u->circuit);
        u->gw = gw;
        u->wake = evtimer_new(f->base, dispatch_wake_cb, u);
        assert_non_null(u->wake);
        f->up[i] = u;
    }
    gw->base = f->base;
    gw->conf = &f->conf;
    gw->ups = f->up;
    gw->nups = s->nups;
    gw->fleet = NULL;
    gw->store = NULL;
    gw->dispatch_ops = &fake_dispatch_ops;
    if (s->flights) {
        gw->flights = flight_table_new(&fake_flight_ops);
        assert_non_null(gw->flights);
        gw->mem = cache_mem_new((size_t)s->mem_entries, 1 << 20);
        assert_non_null(gw->mem);
    }
    f->built = true;
}

static int
fx_teardown(void **state)
{
    struct fx *f = *state;

    if (f->built) {
        for (size_t i = 0; i < f->nreqs; i++) {
            dispatch_leave(f->reqs[i]);
        }
        /* followers and leaders leave their flights, in any order */
        for (size_t i = 0; i < f->nreqs; i++) {
            if (f->reqs[i]->flight) {
                flight_leave(f->reqs[i], false);
            }
        }
        flight_table_free(f->gw.flights);
        cache_mem_free(f->gw.mem);
        for (size_t i = 0; i < f->gw.nups; i++) {
            event_free(f->up[i]->wake);
            free(f->up[i]->auth_body);
            free(f->up[i]);
        }
        event_base_free(f->base);
    }
    for (size_t i = 0; i < f->nreqs; i++) {
        free(f->reqs[i]);
    }
    free(f);
    metrics_free();
    return 0;
}

static struct request *
req_new(struct fx *f, enum prio p, const char *model)
{
    struct request *r = calloc(1, sizeof(*r));

    assert_non_null(r);
    assert_true(f->nreqs < MAX_REQS);
    f->reqs[f->nreqs++] = r;
    r->att = &r->atts[0]; /* as request.c sets it up */
    r->gw = &f->gw;
    r->prio = p;
    r->model = (char *)model;
    r->dialect = &dialect_openai;
    r->id = f->nreqs;
    r->state = REQ_NEW;
    r->t_start_us = http_now_us();
    return r;
}

/* Admission as request.c's admit() does it: a GO takes the slot at once. */
static enum dispatch_result
submit(struct request *r, struct gw_upstream **up)
{
    struct gw_upstream *u = NULL;
    enum dispatch_result res = dispatch_submit(r, &u);

    if (res == DISPATCH_GO) {
        assert_non_null(u);
        r->att->up = u;
        dispatch_acquire(r, u);
        assert_true(r->att->slot_held);
    }
    if (up) {
        *up = u;
    }
    return res;
}

/* The value of one rendered series ("name{labels}"), or -1 when absent. */
static double
metric(const char *series)
{
    struct evbuffer *b = evbuffer_new();
    double v = -1;

    assert_non_null(b);
    metrics_render(b);
    evbuffer_add(b, "", 1);
    const char *text = (const char *)evbuffer_pullup(b, -1);
    size_t n = strlen(series);
    for (const char *p = text; (p = strstr(p, series)); p += n) {
        if ((p == text || p[-1] == '\n') && p[n] == ' ') {
            v = strtod(p + n + 1, NULL);
            break;
        }
    }
    evbuffer_free(b);
    return v;
}

static const char *
up_name(const struct gw_upstream *u)
{
    return u ? u->conf->name : "(none)";
}

/* ---- dispatch: admission ---------------------------------------------------------- */

/* A free slot and nobody waiting: DISPATCH_GO on the right upstream. */
static void
test_submit_go_by_model(void **state)
{
    static const struct gw_spec spec = {
        .nups = 3,
        .ups = {{"a", 1, 1, {"ma", "shared"}},
                {"b", 1, 1, {"mb", "shared"}},
                {"any", 1, 1, {NULL}}},
        .max_queued = 10,
    };
    static const struct {
        const char *model;
        const char *want; /* NULL: no upstream takes it */
    } t[] = {
        {"ma", "a"},
        {"mb", "b"},
        {"other", "any"},
        /* no model: every upstream takes it (dispatch.c eligible(), unlike route_model_for) */
        {NULL, "a"},
        {"shared", "a"}, /* failover: the first in list order */
    };
    struct fx *f = *state;

    fx_build(f, &spec);
    for (size_t i = 0; i < NELEM(t); i++) {
        struct request *r = req_new(f, M, t[i].model);
        struct gw_upstream *up;
        assert_true(dispatch_any_eligible(r));
        enum dispatch_result res = submit(r, &up);
        if (res != DISPATCH_GO || strcmp(up_name(up), t[i].want) != 0) {
            fail_msg("model %s: result %d on %s, want GO on %s", t[i].model ? t[i].model : "NULL",
                     res, up_name(up), t[i].want);
        }
        dispatch_release(r); /* the next case starts from free slots */
        assert_false(r->att->slot_held);
    }
    assert_int_equal(ncalls, 0); /* a GO is the caller's to start */
    assert_int_equal(f->gw.queue.total, 0);
}

/* A model nobody takes: no eligible upstream (request.c answers 404). */
static void
test_unknown_model(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2, .ups = {{"a", 1, 1, {"ma"}}, {"b", 1, 1, {"mb"}}}, .max_queued = 10};
    struct fx *f = *state;

    fx_build(f, &spec);
    assert_false(dispatch_any_eligible(req_new(f, M, "mc")));
    assert_true(dispatch_any_eligible(req_new(f, M, NULL))); /* no model: any upstream */
    assert_true(dispatch_any_eligible(req_new(f, M, "mb")));
    assert_null(dispatch_auth_blocked(req_new(f, M, "mc")));
}

/* A request goes only to upstreams that take its dialect; none: not served (404). */
static void
test_dialect_filter(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2,
        .ups = {{"vllm", 4, 1, {NULL}, DIALECT_BIT(DIALECT_OPENAI)}, {"deepseek", 4, 1, {NULL}, 0}},
        .max_queued = 10};
    struct fx *f = *state;
    struct gw_upstream *up;

    fx_build(f, &spec);
    struct request *o = req_new(f, M, NULL), *a = req_new(f, M, NULL);
    a->dialect = &dialect_anthropic;
    assert_true(dispatch_dialect_served(a));
    assert_int_equal(submit(o, &up), DISPATCH_GO);
    assert_string_equal(up->conf->name, "vllm");
    assert_int_equal(submit(a, &up), DISPATCH_GO);
    assert_string_equal(up->conf->name, "deepseek"); /* failover order, but vllm does not speak it */
    f->uc[1].dialects = DIALECT_BIT(DIALECT_OPENAI);
    struct request *a2 = req_new(f, M, NULL);
    a2->dialect = &dialect_anthropic;
    assert_false(dispatch_dialect_served(a2));
    assert_false(dispatch_any_eligible(a2));
    assert_true(dispatch_dialect_served(req_new(f, M, NULL)));
}

/* A cheap request (token counting) goes at once: no slot, not behind a full queue. */
static void
test_cheap_not_queued(void **state)
{
    static const struct gw_spec spec = {.nups = 1, .ups = {{"a", 1, 1, {NULL}}}, .max_queued = 1};
    struct fx *f = *state;
    struct gw_upstream *up = NULL;

    fx_build(f, &spec);
    struct request *r0 = req_new(f, M, NULL), *r1 = req_new(f, M, NULL);
    assert_int_equal(submit(r0, &up), DISPATCH_GO);
    assert_int_equal(submit(r1, &up), DISPATCH_QUEUED); /* the queue is full now */
    assert_int_equal(submit(req_new(f, M, NULL), &up), DISPATCH_FULL);
    int limit = sched_limit_current(&f->up[0]->limit);
    struct request *c = req_new(f, L, NULL);
    c->dialect = &dialect_anthropic;
    c->cheap = true;
    up = NULL;
    assert_int_equal(dispatch_submit(c, &up), DISPATCH_GO);
    assert_ptr_equal(up, f->up[0]);
    c->att->up = up;
    dispatch_acquire(c, up);
    assert_false(c->att->slot_held);
    assert_int_equal(f->up[0]->limit.inflight, 1); /* r0's only */
    dispatch_held(c);
    assert_false(c->att->held);
    dispatch_limit(c, true); /* says nothing about the limit */
    assert_int_equal(sched_limit_current(&f->up[0]->limit), limit);
    dispatch_release(c);
    assert_int_equal(f->up[0]->limit.inflight, 1);
    /* after a backoff too */
    assert_int_equal(dispatch_requeue(c, &up), DISPATCH_GO);
    assert_true(r1->item.queued);
    dispatch_leave(r1);
    dispatch_release(r0);
}

/* Failover overflows to the next upstream at its limit; then the queue. */
static void
test_submit_failover_then_queue(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2, .ups = {{"a", 2, 1, {NULL}}, {"b", 1, 1, {NULL}}}, .max_queued = 10};
    static const char *const want[] = {"a", "a", "b", NULL, NULL};
    struct fx *f = *state;

    fx_build(f, &spec);
    for (size_t i = 0; i < NELEM(want); i++) {
        struct gw_upstream *up;
        enum dispatch_result res = submit(req_new(f, i == 4 ? H : M, NULL), &up);
        if (want[i]) {
            assert_int_equal(res, DISPATCH_GO);
            assert_string_equal(up_name(up), want[i]);
        } else {
            assert_int_equal(res, DISPATCH_QUEUED);
        }
    }
    assert_int_equal(f->up[0]->limit.inflight, 2);
    assert_int_equal(f->up[1]->limit.inflight, 1);
    assert_int_equal(f->gw.queue.total, 2);
    assert_int_equal(f->gw.queue.depth[H], 1);
    assert_int_equal(f->gw.queue.depth[M], 1);
    assert_int_equal(f->gw.queue.depth[L], 0);
    assert_true(f->reqs[3]->item.queued && f->reqs[4]->item.queued);
    assert_int_equal(ncalls, 0);
    /* the gauges */
    dispatch_update_gauges(&f->gw);
    assert_true(metric("dsgate_queue_depth{priority=\"high\"}") == 1);
    assert_true(metric("dsgate_queue_depth{priority=\"medium\"}") == 1);
    assert_true(metric("dsgate_queue_depth{priority=\"low\"}") == 0);
    assert_true(metric("dsgate_inflight{upstream=\"a\"}") == 2);
    assert_true(metric("dsgate_inflight{upstream=\"b\"}") == 1);
    assert_true(metric("dsgate_concurrency_limit{upstream=\"a\"}") == 2);
    assert_true(metric("dsgate_circuit_open{upstream=\"b\"}") == 0);
}

/* Weighted: smooth weighted round robin, exact shares per cycle. */
static void
test_submit_weighted(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2,
        .ups = {{"a", 100, 3, {NULL}}, {"b", 100, 1, {NULL}}},
        .max_queued = 10,
        .routing = ROUTING_WEIGHTED,
    };
    struct fx *f = *state;
    char seq[17] = "";

    fx_build(f, &spec);
    for (size_t i = 0; i < 16; i++) {
        struct gw_upstream *up;
        assert_int_equal(submit(req_new(f, M, NULL), &up), DISPATCH_GO);
        seq[i] = up_name(up)[0];
    }
    /* every cycle of 4 picks: exactly one "b", never two "b" in a row */
    for (size_t k = 0; k < 16; k += 4) {
        int nb = 0;
        for (size_t i = k; i < k + 4; i++) {
            nb += seq[i] == 'b';
        }
        if (nb != 1) {
            fail_msg("picks %s: cycle at %zu has %d b", seq, k, nb);
        }
    }
    assert_null(strstr(seq, "bb"));
    assert_int_equal(f->up[0]->limit.inflight, 12);
    assert_int_equal(f->up[1]->limit.inflight, 4);
}

/* Nobody jumps the queue: a freed slot goes to the one waiting, via the pump. */
static void
test_no_queue_jumping(void **state)
{
    static const struct gw_spec spec = {.nups = 1, .ups = {{"a", 1, 1, {NULL}}}, .max_queued = 10};
    struct fx *f = *state;
    struct gw_upstream *up;

    fx_build(f, &spec);
    struct request *r0 = req_new(f, M, NULL), *r1 = req_new(f, M, NULL), *r2 = req_new(f, H, NULL);
    assert_int_equal(submit(r0, &up), DISPATCH_GO);
    assert_int_equal(submit(r1, &up), DISPATCH_QUEUED);
    dispatch_release(r0); /* a slot is free, the pump has not run yet */
    assert_true(sched_limit_available(&f->up[0]->limit));
    assert_int_equal(submit(r2, &up), DISPATCH_QUEUED); /* even high waits its turn here */
    assert_int_equal(f->gw.queue.total, 2);
    dispatch_pump(&f->gw);
    /* the pump serves in class order: r2 (high) before r1 (medium) */
    assert_int_equal(ncalls, 1);
    assert_int_equal(calls[0].kind, C_START);
    assert_ptr_equal(calls[0].r, r2);
    assert_ptr_equal(calls[0].up, f->up[0]);
    assert_int_equal(f->gw.queue.total, 1);
    assert_true(r1->item.queued);
    dispatch_pump(&f->gw); /* no slot: nothing */
    assert_int_equal(ncalls, 1);
}

/* The pump starts the heads in class order (FIFO within a class), one per freed slot. */
static void
test_pump_priority_order(void **state)
{
    static const struct gw_spec spec = {.nups = 1, .ups = {{"a", 1, 1, {NULL}}}, .max_queued = 20};
    static const struct {
        const char *push;  /* classes queued, in order */
        const char *order; /* indexes (into push) started, in order */
    } t[] = {
        {"LMHLH", "24103"},
        {"HHH", "012"},
        {"LLLM", "3012"},
        {"MLHML", "20314"},
    };
    struct fx *f = *state;

    fx_build(f, &spec);
    for (size_t c = 0; c < NELEM(t); c++) {
        struct request *busy = req_new(f, H, NULL), *q[8];
        size_t n = strlen(t[c].push);
        ncalls = 0;
        assert_int_equal(submit(busy, NULL), DISPATCH_GO);
        for (size_t i = 0; i < n; i++) {
            char p = t[c].push[i];
            q[i] = req_new(f, p == 'H' ? H : p == 'M' ? M : L, NULL);
            assert_int_equal(submit(q[i], NULL), DISPATCH_QUEUED);
        }
        assert_int_equal(f->gw.queue.total, n);
        char got[9] = "";
        struct request *running = busy;
        for (size_t k = 0; k < n; k++) {
            dispatch_release(running);
            dispatch_pump(&f->gw);
            assert_int_equal(ncalls, k + 1);
            running = calls[k].r;
            for (size_t i = 0; i < n; i++) {
                if (q[i] == running) {
                    got[k] = (char)('0' + i);
                }
            }
        }
        dispatch_release(running);
        if (strcmp(got, t[c].order) != 0) {
            fail_msg("queued %s: started %s, want %s", t[c].push, got, t[c].order);
        }
        assert_int_equal(f->gw.queue.total, 0);
        assert_int_equal(f->up[0]->limit.inflight, 0);
    }
}

/* Two slots freed at once: the pump fills both. */
static void
test_pump_fills_every_slot(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2, .ups = {{"a", 2, 1, {NULL}}, {"b", 1, 1, {NULL}}}, .max_queued = 20};
    struct fx *f = *state;
    struct request *run[3];

    fx_build(f, &spec);
    for (int i = 0; i < 3; i++) {
        run[i] = req_new(f, M, NULL);
        assert_int_equal(submit(run[i], NULL), DISPATCH_GO);
    }
    for (int i = 0; i < 4; i++) {
        assert_int_equal(submit(req_new(f, M, NULL), NULL), DISPATCH_QUEUED);
    }
    for (int i = 0; i < 3; i++) {
        dispatch_release(run[i]);
    }
    dispatch_pump(&f->gw);
    assert_int_equal(ncalls, 3);
    assert_ptr_equal(calls[0].r, f->reqs[3]);
    assert_ptr_equal(calls[0].up, f->up[0]);
    assert_ptr_equal(calls[1].r, f->reqs[4]);
    assert_ptr_equal(calls[1].up, f->up[0]);
    assert_ptr_equal(calls[2].r, f->reqs[5]);
    assert_ptr_equal(calls[2].up, f->up[1]);
    assert_int_equal(f->gw.queue.total, 1);
    assert_true(f->reqs[6]->item.queued);
}

/* A full queue sheds its newest request of the lowest class below the newcomer's. */
static void
test_queue_full_displacement(void **state)
{
    static const struct {
        const char *name;
        int64_t max_queued;
        const char *queued; /* classes queued before, in order */
        char newcomer;
        enum dispatch_result want;
        int victim;               /* index into queued, -1: none */
        size_t depth[PRIO_COUNT]; /* afterwards: high, medium, low */
    } t[] = {
        {"high sheds the newest low", 2, "LL", 'H', DISPATCH_QUEUED, 1, {1, 0, 1}},
        {"high sheds the low, not the medium", 2, "ML", 'H', DISPATCH_QUEUED, 1, {1, 1, 0}},
        {"the lowest class goes first, even if older", 2, "LM", 'H', DISPATCH_QUEUED, 0, {1, 1, 0}},
        {"medium sheds a low", 2, "ML", 'M', DISPATCH_QUEUED, 1, {0, 2, 0}},
        {"newest of the lowest class", 3, "MLL", 'M', DISPATCH_QUEUED, 2, {0, 2, 1}},
        {"nothing lower than medium: full", 2, "HM", 'M', DISPATCH_FULL, -1, {1, 1, 0}},
        {"same class is not lower: full", 2, "LL", 'L', DISPATCH_FULL, -1, {0, 0, 2}},
        {"high among highs: full", 2, "HH", 'H', DISPATCH_FULL, -1, {2, 0, 0}},
        {"not full: no shedding", 3, "ML", 'H', DISPATCH_QUEUED, -1, {1, 1, 1}},
        {"max_queued 0, slot busy: full", -1, "", 'H', DISPATCH_FULL, -1, {0, 0, 0}},
    };

    for (size_t c = 0; c < NELEM(t); c++) {
        struct fx *f = *state;
        struct gw_spec spec = {
            .nups = 1, .ups = {{"a", 1, 1, {NULL}}}, .max_queued = t[c].max_queued};
        struct request *q[4];
        size_t n = strlen(t[c].queued);

        if (c > 0) {
            /* a fresh gateway per case */
            fx_teardown(state);
            fx_setup(state);
            f = *state;
        }
        fx_build(f, &spec);
        assert_int_equal(submit(req_new(f, H, NULL), NULL), DISPATCH_GO);
        for (size_t i = 0; i < n; i++) {
            char p = t[c].queued[i];
            q[i] = req_new(f, p == 'H' ? H : p == 'M' ? M : L, NULL);
            assert_int_equal(submit(q[i], NULL), DISPATCH_QUEUED);
        }
        char p = t[c].newcomer;
        struct request *r = req_new(f, p == 'H' ? H : p == 'M' ? M : L, NULL);
        enum dispatch_result res = submit(r, NULL);
        if (res != t[c].want) {
            fail_msg("%s: result %d, want %d", t[c].name, res, t[c].want);
        }
        assert_int_equal(r->item.queued, t[c].want == DISPATCH_QUEUED);
        if (t[c].victim >= 0) {
            struct request *v = q[t[c].victim];
            if (ncalls != 1 || calls[0].kind != C_REFUSE || calls[0].r != v ||
                calls[0].why != REFUSE_DISPLACED || calls[0].up != NULL) {
                fail_msg("%s: the victim was not refused as displaced (%zu calls)", t[c].name,
                         ncalls);
            }
            assert_false(v->item.queued);
            assert_true(v->queue_us >= 0);
        } else if (ncalls != 0) {
            fail_msg("%s: %zu calls, want none", t[c].name, ncalls);
        }
        for (int k = 0; k < PRIO_COUNT; k++) {
            if (f->gw.queue.depth[k] != t[c].depth[k]) {
                fail_msg("%s: depth[%d] %zu, want %zu", t[c].name, k, f->gw.queue.depth[k],
                         t[c].depth[k]);
            }
        }
        double full = metric("dsgate_queue_rejected_total{reason=\"full\"}");
        double displaced = metric("dsgate_queue_rejected_total{reason=\"displaced\"}");
        assert_true(full == (t[c].want == DISPATCH_FULL ? 1 : -1));
        assert_true(displaced == (t[c].victim >= 0 ? 1 : -1));
    }
}

/* max_queued 0: a free slot still takes the request at once. */
static void
test_max_queued_zero_go(void **state)
{
    static const struct gw_spec spec = {.nups = 1, .ups = {{"a", 1, 1, {NULL}}}, .max_queued = -1};
    struct fx *f = *state;

    fx_build(f, &spec);
    assert_int_equal(submit(req_new(f, L, NULL), NULL), DISPATCH_GO);
    assert_int_equal(submit(req_new(f, H, NULL), NULL), DISPATCH_FULL);
}

/* Back from a backoff: queued even over max_queued, never refused. */
static void
test_requeue_never_refuses(void **state)
{
    static const struct gw_spec spec = {.nups = 1, .ups = {{"a", 1, 1, {NULL}}}, .max_queued = 1};
    struct fx *f = *state;
    struct gw_upstream *up = NULL;

    fx_build(f, &spec);
    assert_int_equal(submit(req_new(f, H, NULL), NULL), DISPATCH_GO);
    assert_int_equal(submit(req_new(f, H, NULL), NULL), DISPATCH_QUEUED);
    struct request *back = req_new(f, L, NULL);
    assert_int_equal(dispatch_requeue(back, &up), DISPATCH_QUEUED);
    assert_int_equal(f->gw.queue.total, 2);
    assert_int_equal(ncalls, 0);
    /* and a newcomer still finds it full, and may shed the requeued low one */
    assert_int_equal(submit(req_new(f, M, NULL), NULL), DISPATCH_QUEUED);
    assert_int_equal(ncalls, 1);
    assert_ptr_equal(calls[0].r, back);
}

/* Leaving the queue counts the wait, and twice is harmless. */
static void
test_leave(void **state)
{
    static const struct gw_spec spec = {.nups = 1, .ups = {{"a", 1, 1, {NULL}}}, .max_queued = 5};
    struct fx *f = *state;

    fx_build(f, &spec);
    assert_int_equal(submit(req_new(f, M, NULL), NULL), DISPATCH_GO);
    struct request *r = req_new(f, L, NULL);
    assert_int_equal(submit(r, NULL), DISPATCH_QUEUED);
    dispatch_leave(r);
    assert_false(r->item.queued);
    assert_int_equal(f->gw.queue.total, 0);
    assert_int_equal(f->gw.queue.depth[L], 0);
    assert_true(r->queue_us >= 0);
    int64_t q = r->queue_us;
    dispatch_leave(r);
    assert_int_equal(r->queue_us, q);
    /* one observation for each way out of admission: the GO (0 s) and this wait */
    assert_true(metric("dsgate_queue_wait_seconds_count") == 2);
    dispatch_pump(&f->gw);
    assert_int_equal(ncalls, 0);
}

/*
 * CURRENT behaviour, suspected bug (dispatch.c, dispatch_submit): the
 * "full" check looks at the queue as a whole.  Upstream "a" is busy and its
 * queue is full; a request only "b" takes finds "b" idle with nobody
 * waiting for it, yet it is refused (or sheds a lower-class request queued
 * for "a").  Flip these expectations when that is fixed.
 */
static void
test_full_queue_refuses_idle_other_upstream(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2, .ups = {{"a", 1, 1, {"ma"}}, {"b", 1, 1, {"mb"}}}, .max_queued = 1};
    struct fx *f = *state;

    fx_build(f, &spec);
    assert_int_equal(submit(req_new(f, M, "ma"), NULL), DISPATCH_GO);
    struct request *low_a = req_new(f, L, "ma");
    assert_int_equal(submit(low_a, NULL), DISPATCH_QUEUED);
    assert_true(sched_limit_available(&f->up[1]->limit));
    /* same class: refused, although "b" is idle */
    assert_int_equal(submit(req_new(f, L, "mb"), NULL), DISPATCH_FULL);
    /* higher class: sheds the request waiting for "a", then goes to "b" at once */
    struct gw_upstream *up = NULL;
    assert_int_equal(submit(req_new(f, H, "mb"), &up), DISPATCH_GO);
    assert_ptr_equal(up, f->up[1]);
    assert_int_equal(ncalls, 1);
    assert_int_equal(calls[0].kind, C_REFUSE);
    assert_ptr_equal(calls[0].r, low_a);
}

/* Requests for different upstreams wait in different queues: "b" frees, "b"'s waiter goes. */
static void
test_queues_by_destination(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2, .ups = {{"a", 1, 1, {"ma"}}, {"b", 1, 1, {"mb"}}}, .max_queued = 10};
    struct fx *f = *state;

    fx_build(f, &spec);
    struct request *ra = req_new(f, M, "ma"), *rb = req_new(f, M, "mb");
    assert_int_equal(submit(ra, NULL), DISPATCH_GO);
    assert_int_equal(submit(rb, NULL), DISPATCH_GO);
    struct request *wa = req_new(f, H, "ma"), *wb = req_new(f, L, "mb");
    assert_int_equal(submit(wa, NULL), DISPATCH_QUEUED);
    assert_int_equal(submit(wb, NULL), DISPATCH_QUEUED);
    dispatch_release(rb);
    dispatch_pump(&f->gw);
    /* the high one waits for "a"; the low one for "b" is not held behind it */
    assert_int_equal(ncalls, 1);
    assert_ptr_equal(calls[0].r, wb);
    assert_ptr_equal(calls[0].up, f->up[1]);
    assert_true(wa->item.queued);
}

/* ---- dispatch: circuits ------------------------------------------------------------- */

enum cst {
    CL,    /* closed */
    AUTHB, /* opened by a 401, its answer kept */
    AUTHN, /* opened by a 401, no answer kept */
    AUTHX, /* opened by a 401, the cooldown over */
    FAILO, /* opened by failures */
    AUTHF, /* opened by a 401 (answer kept), then a late failure of an earlier attempt */
};

static void
set_circuit(struct gw_upstream *u, enum cst s)
{
    int64_t now = http_now_us();

    switch (s) {
    case CL:
        break;
    case AUTHB:
    case AUTHN:
    case AUTHX:
        circuit_on_result(&u->circuit, ROUTE_AUTH_FAILURE, "401", now);
        if (s != AUTHN) {
            u->auth_body = strdup("{\"error\":{\"message\":\"bad key\"}}");
            assert_non_null(u->auth_body);
            u->auth_body_len = strlen(u->auth_body);
            u->auth_status = 401;
        }
        if (s == AUTHX) {
            u->circuit.open_until_us = now - 1;
        }
        break;
    case AUTHF:
        set_circuit(u, AUTHB);
        circuit_on_result(&u->circuit, ROUTE_FAILURE, "timeout", now);
        break;
    case FAILO:
        for (int i = 0; i < ROUTE_TRIP_FAILURES; i++) {
            circuit_on_result(&u->circuit, ROUTE_FAILURE, "503", now);
        }
        break;
    }
    assert_int_equal(u->circuit.state, s == CL ? CIRCUIT_CLOSED : CIRCUIT_OPEN);
}

static void
test_auth_blocked(void **state)
{
    static const struct {
        const char *name;
        size_t nups;
        enum cst c[2];
        const char *only[2]; /* the one model an upstream takes, NULL: any */
        const char *model;
        int want; /* index of the upstream whose answer is replayed, -1: NULL */
        enum circuit_state after0;
    } t[] = {
        /* clang-format off */
        {"both auth-open: the first's answer", 2, {AUTHB, AUTHB}, {NULL, NULL}, NULL, 0,
         CIRCUIT_OPEN},
        {"the first with an answer", 2, {AUTHN, AUTHB}, {NULL, NULL}, NULL, 1, CIRCUIT_OPEN},
        {"one closed: wait for it", 2, {AUTHB, CL}, {NULL, NULL}, NULL, -1, CIRCUIT_OPEN},
        {"one open by failures: it recovers", 2, {AUTHB, FAILO}, {NULL, NULL}, NULL, -1,
         CIRCUIT_OPEN},
        /* every one shut, but nothing to replay: the request waits (until max_wait) */
        {"no answer kept", 2, {AUTHN, AUTHN}, {NULL, NULL}, NULL, -1, CIRCUIT_OPEN},
        {"only eligible upstreams count", 2, {CL, AUTHB}, {"x", NULL}, "y", 1, CIRCUIT_CLOSED},
        {"cooldown over: half open, usable", 1, {AUTHX, CL}, {NULL, NULL}, NULL, -1,
         CIRCUIT_HALF_OPEN},
        {"single upstream auth-open", 1, {AUTHB, CL}, {NULL, NULL}, NULL, 0, CIRCUIT_OPEN},
        {"nobody eligible: not blocked", 2, {AUTHB, AUTHB}, {"x", "x"}, "z", -1, CIRCUIT_OPEN},
        /* a late failure of an earlier attempt leaves it auth-open: the kept 401 is answered */
        {"auth-open, then a late failure", 1, {AUTHF, CL}, {NULL, NULL}, NULL, 0, CIRCUIT_OPEN},
        /* clang-format on */
    };

    for (size_t c = 0; c < NELEM(t); c++) {
        struct fx *f;
        struct gw_spec spec = {.nups = t[c].nups, .max_queued = 10};

        if (c > 0) {
            fx_teardown(state);
            fx_setup(state);
        }
        f = *state;
        for (size_t i = 0; i < t[c].nups; i++) {
            spec.ups[i] = (struct up_spec){i ? "b" : "a", 1, 1, {t[c].only[i]}, 0};
        }
        fx_build(f, &spec);
        for (size_t i = 0; i < t[c].nups; i++) {
            set_circuit(f->up[i], t[c].c[i]);
        }
        struct gw_upstream *got = dispatch_auth_blocked(req_new(f, M, t[c].model));
        struct gw_upstream *want = t[c].want >= 0 ? f->up[t[c].want] : NULL;
        if (got != want) {
            fail_msg("%s: %s, want %s", t[c].name, up_name(got), up_name(want));
        }
        if (f->up[0]->circuit.state != t[c].after0) {
            fail_msg("%s: circuit of a is %s afterwards", t[c].name,
                     circuit_state_name(f->up[0]->circuit.state));
        }
    }
}

/* A queued request whose every upstream becomes auth-shut is refused by the pump. */
static void
test_pump_refuses_auth_blocked(void **state)
{
    static const struct gw_spec spec = {.nups = 1, .ups = {{"a", 1, 1, {NULL}}}, .max_queued = 5};
    struct fx *f = *state;

    fx_build(f, &spec);
    struct request *r0 = req_new(f, M, NULL), *r1 = req_new(f, M, NULL), *r2 = req_new(f, L, NULL);
    assert_int_equal(submit(r0, NULL), DISPATCH_GO);
    assert_int_equal(submit(r1, NULL), DISPATCH_QUEUED);
    assert_int_equal(submit(r2, NULL), DISPATCH_QUEUED);
    set_circuit(f->up[0], AUTHB);
    dispatch_release(r0);
    dispatch_pump(&f->gw);
    assert_int_equal(ncalls, 2);
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(calls[i].kind, C_REFUSE);
        assert_int_equal(calls[i].why, REFUSE_AUTH);
        assert_ptr_equal(calls[i].up, f->up[0]);
    }
    assert_ptr_equal(calls[0].r, r1);
    assert_ptr_equal(calls[1].r, r2);
    assert_int_equal(f->gw.queue.total, 0);
    /* and a newcomer is told at once by route(): */
    assert_ptr_equal(dispatch_auth_blocked(req_new(f, H, NULL)), f->up[0]);
}

/* An upstream whose circuit is open is skipped; all open: queued. */
static void
test_submit_skips_open_circuit(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2, .ups = {{"a", 5, 1, {NULL}}, {"b", 5, 1, {NULL}}}, .max_queued = 5};
    struct fx *f = *state;
    struct gw_upstream *up;

    fx_build(f, &spec);
    set_circuit(f->up[0], FAILO);
    assert_int_equal(submit(req_new(f, M, NULL), &up), DISPATCH_GO);
    assert_ptr_equal(up, f->up[1]);
    /* every circuit open for failures: the last way out still takes it (nginx's rule) */
    set_circuit(f->up[1], FAILO);
    assert_int_equal(submit(req_new(f, M, NULL), &up), DISPATCH_GO);
    assert_ptr_equal(up, f->up[0]);
    assert_null(dispatch_auth_blocked(f->reqs[1])); /* failures are not the account's */
    assert_true(dispatch_unreachable(f->reqs[1]) < 0);
}

/*
 * A held attempt (keep-alives, no data) of a lower class is taken back when
 * a higher class waits for its upstream; the same class, or one with data,
 * is not.  The held signal is an overload sample for the limit.
 */
static void
test_shed_held_for_higher_class(void **state)
{
    static const struct gw_spec spec = {.nups = 1, .ups = {{"a", 3, 1, {NULL}}}, .max_queued = 5};
    struct fx *f = *state;
    struct gw_upstream *up;

    fx_build(f, &spec);
    struct request *lo = req_new(f, L, NULL), *lo2 = req_new(f, L, NULL),
                   *med = req_new(f, M, NULL);
    struct request *run[3] = {lo, lo2, med};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(submit(run[i], &up), DISPATCH_GO);
        run[i]->state = REQ_ATTEMPT;
        run[i]->lnext = f->gw.live; /* the live list, as request.c keeps it */
        f->gw.live = run[i];
    }
    dispatch_held(lo);
    dispatch_held(med);
    lo2->data_sent = true; /* data flows: never taken back */
    assert_int_equal(f->gw.held, 2);
    assert_true(lo->att->held && lo->att->limit_fed);
    /* a medium waits: nothing lower than medium is held but lo */
    struct request *m2 = req_new(f, M, NULL);
    assert_int_equal(submit(m2, &up), DISPATCH_QUEUED);
    ncalls = 0;
    dispatch_pump(&f->gw);
    assert_int_equal(ncalls, 2);
    assert_int_equal(calls[0].kind, C_SHED);
    assert_ptr_equal(calls[0].r, lo);
    assert_int_equal(calls[1].kind, C_START);
    assert_ptr_equal(calls[1].r, m2); /* lo's slot, not lo */
    assert_int_equal(f->gw.held, 1);
    assert_true(lo->item.queued);
    /* a low waiting sheds nothing (med is higher, lo2 has data) */
    dispatch_leave(lo);
    lo->state = REQ_NEW;
    struct request *lo3 = req_new(f, L, NULL);
    assert_int_equal(submit(lo3, &up), DISPATCH_QUEUED);
    ncalls = 0;
    dispatch_pump(&f->gw);
    assert_int_equal(ncalls, 0);
    /* the first data byte of a held attempt ends its hold, and it was fed once */
    dispatch_first_data(med, 1000);
    assert_int_equal(f->gw.held, 0);
    assert_false(med->att->held);
    f->gw.live = NULL;
}

/* A stream's time to first data: a baseline learnt, a queued sample told apart. */
static void
test_first_data_baseline(void **state)
{
    struct sched_limit l;

    (void)state;
    sched_limit_init(&l, 64, true);
    for (int i = 0; i < 8; i++) {
        assert_false(sched_limit_sample(&l, 200000 + i * 1000)); /* ~200 ms */
    }
    assert_true(l.baseline_us > 190000 && l.baseline_us < 215000);
    assert_false(sched_limit_sample(&l, 300000)); /* slower, not queued */
    assert_false(sched_limit_sample(&l, 600000)); /* 3x but within the margin */
    assert_true(sched_limit_sample(&l, 5000000)); /* 5 s: queued upstream */
    assert_int_equal(l.sample_us, 5000000);
    assert_true(l.baseline_us < 230000 + 10000); /* a queued sample barely moves it */
    /* a model that became slower for good is learnt, slowly */
    for (int i = 0; i < 2000; i++) {
        sched_limit_sample(&l, 3000000);
    }
    assert_false(sched_limit_sample(&l, 3000000));
}

/* Every circuit open on connect errors: nothing can be reached; say when to come back. */
static void
test_unreachable(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2, .ups = {{"a", 5, 1, {NULL}}, {"b", 5, 1, {NULL}}}, .max_queued = 5};
    struct fx *f = *state;
    struct gw_upstream *up;
    int64_t now = http_now_us();

    fx_build(f, &spec);
    for (int i = 0; i < ROUTE_TRIP_FAILURES; i++) {
        circuit_on_result(&f->up[0]->circuit, ROUTE_FAILURE, "connect", now);
    }
    struct request *r = req_new(f, M, NULL);
    assert_true(dispatch_unreachable(r) < 0); /* "b" is fine */
    for (int i = 0; i < ROUTE_TRIP_FAILURES; i++) {
        circuit_on_result(&f->up[1]->circuit, ROUTE_FAILURE, "connect", now);
    }
    int64_t ms = dispatch_unreachable(r);
    assert_true(ms >= 0 && ms <= ROUTE_COOLDOWN_MS);
    assert_int_equal(submit(r, &up), DISPATCH_QUEUED); /* the owner answers 503 first */
    /* one open for failures is still a way out */
    circuit_init(&f->up[1]->circuit);
    for (int i = 0; i < ROUTE_TRIP_FAILURES; i++) {
        circuit_on_result(&f->up[1]->circuit, ROUTE_FAILURE, "503", now);
    }
    assert_true(dispatch_unreachable(r) < 0);
}

/* After a failure: is there a usable upstream this request has not tried? */
static void
test_alternative(void **state)
{
    static const struct {
        const char *name;
        size_t nups;
        const char *only[3]; /* the one model an upstream takes, NULL: any */
        unsigned open, busy; /* upstreams with an open circuit, at their limit */
        uint64_t tried;      /* before */
        size_t failed_on;
        bool want;
        uint64_t tried_after;
    } t[] = {
        {"another, untried", 2, {NULL, NULL, NULL}, 0, 0, 0, 0, true, 1},
        {"the second failed too", 2, {NULL, NULL, NULL}, 0, 0, 1, 1, false, 3},
        {"a single upstream", 1, {NULL, NULL, NULL}, 0, 0, 0, 0, false, 1},
        {"the other is open", 2, {NULL, NULL, NULL}, 2, 0, 0, 0, false, 1},
        {"the other is busy: no alternative now", 2, {NULL, NULL, NULL}, 0, 2, 0, 0, false, 1},
        {"the other does not take the model", 2, {NULL, "x", NULL}, 0, 0, 0, 0, false, 1},
        {"the third does", 3, {NULL, "x", NULL}, 0, 0, 0, 0, true, 1},
        {"failed on the last, the first untried", 3, {NULL, NULL, NULL}, 0, 0, 2, 2, true, 6},
        {"all three tried", 3, {NULL, NULL, NULL}, 0, 0, 3, 2, false, 7},
    };

    for (size_t c = 0; c < NELEM(t); c++) {
        struct fx *f;
        struct gw_spec spec = {.nups = t[c].nups, .max_queued = 10};
        static const char *const names[] = {"a", "b", "c"};

        if (c > 0) {
            fx_teardown(state);
            fx_setup(state);
        }
        f = *state;
        for (size_t i = 0; i < t[c].nups; i++) {
            spec.ups[i] = (struct up_spec){names[i], 1, 1, {t[c].only[i]}, 0};
        }
        fx_build(f, &spec);
        for (size_t i = 0; i < t[c].nups; i++) {
            if (t[c].open & (1u << i)) {
                set_circuit(f->up[i], FAILO);
            }
            if (t[c].busy & (1u << i)) {
                sched_limit_acquire(&f->up[i]->limit);
            }
        }
        struct request *r = req_new(f, M, "m");
        r->att->up = f->up[t[c].failed_on];
        r->tried = t[c].tried;
        bool got = dispatch_alternative(r);
        if (got != t[c].want || r->tried != t[c].tried_after) {
            fail_msg("%s: alternative %d tried %#llx, want %d %#llx", t[c].name, got,
                     (unsigned long long)r->tried, t[c].want, (unsigned long long)t[c].tried_after);
        }
        dispatch_forget_tried(r);
        assert_int_equal(r->tried, 0);
    }
}

/* A retry moves on: the untried upstream is picked first. */
static void
test_requeue_prefers_untried(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2, .ups = {{"a", 2, 1, {NULL}}, {"b", 2, 1, {NULL}}}, .max_queued = 5};
    struct fx *f = *state;
    struct gw_upstream *up = NULL;

    fx_build(f, &spec);
    struct request *r = req_new(f, M, NULL);
    assert_int_equal(submit(r, &up), DISPATCH_GO);
    assert_ptr_equal(up, f->up[0]);
    dispatch_release(r);
    assert_true(dispatch_alternative(r)); /* "a" failed it */
    assert_int_equal(dispatch_requeue(r, &up), DISPATCH_GO);
    assert_ptr_equal(up, f->up[1]);
}

/*
 * An untried upstream with no free slot is no alternative: the retry backs
 * off instead of going straight back to the upstream that just failed it.
 */
static void
test_full_untried_is_no_alternative(void **state)
{
    static const struct gw_spec spec = {
        .nups = 2, .ups = {{"a", 1, 1, {NULL}}, {"b", 1, 1, {NULL}}}, .max_queued = 5};
    struct fx *f = *state;
    struct gw_upstream *up = NULL;

    fx_build(f, &spec);
    struct request *r = req_new(f, M, NULL), *other = req_new(f, M, NULL);
    assert_int_equal(submit(r, &up), DISPATCH_GO);
    assert_ptr_equal(up, f->up[0]);
    assert_int_equal(submit(other, &up), DISPATCH_GO);
    assert_ptr_equal(up, f->up[1]);
    dispatch_release(r);                   /* r's attempt on "a" failed */
    assert_false(dispatch_alternative(r)); /* "b" is untried but full: back off */
}

/* What the breaker, the limit and the counters hear of an attempt. */
static void
test_circuit_limit_count(void **state)
{
    static const struct gw_spec spec = {.nups = 1, .ups = {{"a", 4, 1, {NULL}}}, .max_queued = 5};
    struct fx *f = *state;

    fx_build(f, &spec);
    struct request *r = req_new(f, M, NULL);
    assert_int_equal(submit(r, NULL), DISPATCH_GO);
    struct gw_upstream *u = f->up[0];
    /* counters: one series per outcome, found once */
    dispatch_count(r, "ok");
    dispatch_count(r, "ok");
    dispatch_count(r, attempt_outcome_label(ATT_CONNECT, 0));
    assert_true(metric("dsgate_upstream_attempts_total{upstream=\"a\",outcome=\"ok\"}") == 2);
    assert_true(
        metric("dsgate_upstream_attempts_total{upstream=\"a\",outcome=\"connect_error\"}") == 1);
    assert_int_equal(u->n_m_attempts, 2);
    /* failures open the breaker after ROUTE_TRIP_FAILURES and arm the wake-up */
    for (int i = 0; i < ROUTE_TRIP_FAILURES - 1; i++) {
        dispatch_circuit(r, ROUTE_FAILURE, "connect");
        assert_int_equal(u->circuit.state, CIRCUIT_CLOSED);
    }
    assert_false(event_pending(u->wake, EV_TIMEOUT, NULL));
    dispatch_circuit(r, ROUTE_FAILURE, "connect");
    assert_int_equal(u->circuit.state, CIRCUIT_OPEN);
    assert_true(event_pending(u->wake, EV_TIMEOUT, NULL));
    dispatch_update_gauges(&f->gw);
    assert_true(metric("dsgate_circuit_open{upstream=\"a\"}") == 1);
    /* a neutral end says nothing */
    dispatch_circuit(r, ROUTE_NEUTRAL, "");
    assert_int_equal(u->circuit.state, CIRCUIT_OPEN);
    /* a success closes it; then an auth answer opens it for the long cooldown */
    dispatch_circuit(r, ROUTE_SUCCESS, "200");
    assert_int_equal(u->circuit.state, CIRCUIT_CLOSED);
    event_del(u->wake);
    dispatch_circuit(r, ROUTE_AUTH_FAILURE, "402");
    assert_int_equal(u->circuit.state, CIRCUIT_OPEN);
    assert_true(u->circuit.auth);
    assert_true(event_pending(u->wake, EV_TIMEOUT, NULL));
    /* the limit: successes keep it, the slot comes back once */
    dispatch_limit(r, false);
    assert_int_equal(sched_limit_current(&u->limit), 4);
    assert_int_equal(u->limit.inflight, 1);
    dispatch_release(r);
    dispatch_release(r);
    assert_int_equal(u->limit.inflight, 0);
    assert_false(r->att->slot_held);
}

/* ---- flight ----------------------------------------------------------------------- */

static const struct gw_spec flight_spec = {
    .nups = 1, .ups = {{"a", 4, 1, {NULL}}}, .max_queued = 10, .flights = true, .mem_entries = 16};

static struct request *
flight_req(struct fx *f, uint8_t key)
{
    struct request *r = req_new(f, M, NULL);

    memset(r->key, key, CACHE_KEY_LEN);
    r->cacheable = r->store_ok = r->lookup = r->may_join = true;
    r->cache_status = CS_MISS;
    r->att->up = f->up[0];
    r->hreq = NULL; /* no client: feed() does nothing */
    return r;
}

static size_t
count_calls(enum call_kind k, const struct request *r)
{
    size_t n = 0;

    for (size_t i = 0; i < ncalls; i++) {
        n += calls[i].kind == k && (!r || calls[i].r == r);
    }
    return n;
}

static void
test_flight_roles(void **state)
{
    struct fx *f = *state;

    fx_build(f, &flight_spec);
    struct request *lead = flight_req(f, 1), *fol1 = flight_req(f, 1), *fol2 = flight_req(f, 1);
    struct request *other = flight_req(f, 2), *nojoin = flight_req(f, 1);
    nojoin->may_join = false;

    assert_int_equal(flight_enter(lead), FLIGHT_LEAD);
    assert_false(flight_has_followers(lead));
    assert_false(request_wanted(lead)); /* no client, nobody waiting */
    assert_int_equal(flight_enter(fol1), FLIGHT_FOLLOW);
    assert_int_equal(flight_enter(fol2), FLIGHT_FOLLOW);
    assert_ptr_equal(fol1->flight, lead->flight);
    assert_ptr_equal(fol2->flight, lead->flight);
    assert_true(flight_has_followers(lead));
    assert_false(flight_has_followers(fol1)); /* a follower leads nothing */
    assert_true(request_wanted(lead));        /* headless, but followed */
    assert_false(request_wanted(fol1));
    assert_true(metric("dsgate_coalesced_total") == 2);
    /* a different key leads its own flight */
    assert_int_equal(flight_enter(other), FLIGHT_LEAD);
    assert_ptr_not_equal(other->flight, lead->flight);
    /* one that may not join leads a flight of its own, even for the same key */
    assert_int_equal(flight_enter(nojoin), FLIGHT_LEAD);
    assert_ptr_not_equal(nojoin->flight, lead->flight);
    /* a follower that leaves is unlinked; the leader keeps its flight */
    flight_leave(fol2, false);
    assert_null(fol2->flight);
    assert_non_null(lead->flight);
    assert_true(flight_has_followers(lead));
    /* bytes only count from the leader */
    assert_false(flight_append(fol1, "x", 1));
    assert_false(flight_append(fol2, "x", 1));
    assert_int_equal(ncalls, 0);
}

/* The ways a flight dissolves: followers that had not started are let go. */
enum dissolve_how { BY_HEAD, BY_LEAVE_FAIL, BY_LEAVE_OK_NO_HEAD, BY_TOO_LARGE };

static void
test_flight_dissolve(void **state)
{
    static const struct {
        const char *name;
        enum dissolve_how how;
        int status; /* BY_HEAD */
        size_t nfollowers;
    } t[] = {
        {"a 503 head", BY_HEAD, 503, 1},
        {"a 429 head, three followers", BY_HEAD, 429, 3},
        {"a 404 head", BY_HEAD, 404, 2},
        {"a 401 head, nobody follows", BY_HEAD, 401, 0},
        {"the leader failed", BY_LEAVE_FAIL, 0, 2},
        {"the leader failed, nobody follows", BY_LEAVE_FAIL, 0, 0},
        {"ended well but no head was seen", BY_LEAVE_OK_NO_HEAD, 0, 2},
        {"the answer is too large to share", BY_TOO_LARGE, 200, 2},
    };
    static char big[1024 * 1024];

    memset(big, 'x', sizeof(big));
    for (size_t c = 0; c < NELEM(t); c++) {
        struct fx *f;
        struct request *fol[3];

        if (c > 0) {
            fx_teardown(state);
            fx_setup(state);
        }
        f = *state;
        fx_build(f, &flight_spec);
        struct request *lead = flight_req(f, 7);
        assert_int_equal(flight_enter(lead), FLIGHT_LEAD);
        for (size_t i = 0; i < t[c].nfollowers; i++) {
            fol[i] = flight_req(f, 7);
            assert_int_equal(flight_enter(fol[i]), FLIGHT_FOLLOW);
            fol[i]->may_join = false; /* dissolve sets it back */
        }
        switch (t[c].how) {
        case BY_HEAD:
            flight_head(lead, t[c].status, "application/json");
            assert_false(flight_append(lead, "{}", 2));
            break;
        case BY_LEAVE_FAIL:
            flight_leave(lead, false);
            break;
        case BY_LEAVE_OK_NO_HEAD:
            flight_leave(lead, true);
            break;
        case BY_TOO_LARGE:
            flight_head(lead, 200, "application/json");
            assert_int_equal(ncalls, 0);
            assert_true(flight_append(lead, big, sizeof(big)));
            assert_true(flight_append(lead, big, sizeof(big))); /* exactly the cap */
            assert_int_equal(ncalls, 0);
            assert_false(flight_append(lead, "x", 1));
            break;
        }
        if (ncalls != t[c].nfollowers || count_calls(C_FOLLOWER_FREE, NULL) != ncalls) {
            fail_msg("%s: %zu calls, want %zu follower_free", t[c].name, ncalls, t[c].nfollowers);
        }
        for (size_t i = 0; i < t[c].nfollowers; i++) {
            assert_int_equal(count_calls(C_FOLLOWER_FREE, fol[i]), 1);
            assert_null(fol[i]->flight);
            assert_true(fol[i]->may_join);
            assert_false(fol[i]->follow_started);
        }
        assert_null(lead->flight);
        assert_false(flight_has_followers(lead));
        /* the key is free again: the first let go leads, the others follow it */
        struct request *again = t[c].nfollowers ? fol[0] : flight_req(f, 7);
        assert_int_equal(flight_enter(again), FLIGHT_LEAD);
        for (size_t i = 1; i < t[c].nfollowers; i++) {
            assert_int_equal(flight_enter(fol[i]), FLIGHT_FOLLOW);
            assert_ptr_equal(fol[i]->flight, again->flight);
        }
        /* the old leader's later calls are harmless */
        flight_head(lead, 200, NULL);
        flight_leave(lead, true);
        assert_int_equal(ncalls, t[c].nfollowers);
    }
}

/* A good answer: stored in the memory tier (or not), the flight leaves the table. */
static void
test_flight_leader_done(void **state)
{
    static const struct {
        const char *name;
        bool sse, store_ok;
        int64_t mem_entries;
        const char *body;
        const char *stored; /* NULL: nothing stored */
    } t[] = {
        {"JSON, leading white space dropped", false, true, 16, " \r\n{\"id\":\"x\",\"n\":1}",
         "{\"id\":\"x\",\"n\":1}"},
        {"no-store", false, false, 16, "{\"id\":\"x\"}", NULL},
        {"an error object is not stored", false, true, 16, "{\"error\":{\"code\":1}}", NULL},
        {"not JSON", false, true, 16, "{\"id\":", NULL},
        {"memory tier off", false, true, 0, "{\"id\":\"x\"}", NULL},
        {"SSE ending in [DONE]", true, true, 16, ": ka\n\ndata: {\"a\":1}\n\ndata: [DONE]\n\n",
         "data: {\"a\":1}\n\ndata: [DONE]\n\n"},
        {"SSE cut short", true, true, 16, "data: {\"a\":1}\n\n", NULL},
    };

    for (size_t c = 0; c < NELEM(t); c++) {
        struct fx *f;
        struct gw_spec spec = flight_spec;

        if (c > 0) {
            fx_teardown(state);
            fx_setup(state);
        }
        f = *state;
        spec.mem_entries = t[c].mem_entries;
        fx_build(f, &spec);
        struct request *lead = flight_req(f, 9), *fol = flight_req(f, 9);
        lead->store_ok = t[c].store_ok;
        lead->sse = t[c].sse;
        assert_int_equal(flight_enter(lead), FLIGHT_LEAD);
        assert_int_equal(flight_enter(fol), FLIGHT_FOLLOW);
        flight_head(lead, 200, t[c].sse ? "text/event-stream" : "application/json");
        size_t len = strlen(t[c].body);
        /* in two pieces, as a transfer delivers it */
        assert_true(flight_append(lead, t[c].body, len / 2));
        assert_true(flight_append(lead, t[c].body + len / 2, len - len / 2));
        flight_leave(lead, true);
        assert_null(lead->flight);
        /* a follower without a client is not told anything (it replays on drain) */
        assert_int_equal(ncalls, 0);
        assert_non_null(fol->flight);

        struct cache_entry *e = cache_mem_get(f->gw.mem, lead->key, cache_now_ms());
        if ((e != NULL) != (t[c].stored != NULL)) {
            fail_msg("%s: %s", t[c].name, e ? "stored" : "not stored");
        }
        if (e) {
            assert_int_equal(e->body_len, strlen(t[c].stored));
            assert_memory_equal(e->body, t[c].stored, e->body_len);
            assert_int_equal(e->sse, t[c].sse);
            assert_string_equal(e->ctype, t[c].sse ? "text/event-stream" : "application/json");
            assert_true(metric("dsgate_cache_stores_total{tier=\"memory\"}") == 1);
            cache_entry_unref(e);
        } else {
            assert_true(metric("dsgate_cache_stores_total{tier=\"memory\"}") == -1);
        }
        assert_int_equal(cache_mem_count(f->gw.mem), t[c].stored ? 1 : 0);
        /* the finished flight left the table: the same key leads anew */
        struct request *late = flight_req(f, 9);
        assert_int_equal(flight_enter(late), FLIGHT_LEAD);
        assert_ptr_not_equal(late->flight, fol->flight);
        flight_leave(fol, false); /* the last reference to the old flight */
        assert_null(fol->flight);
        assert_int_equal(ncalls, 0);
    }
}

/* A follower's client leaves: the leader is handed back when nobody is left to answer. */
static void
test_flight_follower_gone(void **state)
{
    static const struct {
        const char *name;
        bool leader_has_client;
        size_t nfollowers;
        const char *gone; /* indexes of followers that leave, in order */
        int orphan_at;    /* position in GONE whose departure returns the leader, -1: none */
    } t[] = {
        {"headless leader, its only follower leaves", false, 1, "0", 0},
        {"headless leader, the last of two", false, 2, "10", 1},
        {"headless leader, one of two", false, 2, "0", -1},
        {"the leader has a client", true, 2, "01", -1},
    };
    static int dummy_client;

    for (size_t c = 0; c < NELEM(t); c++) {
        struct fx *f;
        struct request *fol[3];

        if (c > 0) {
            fx_teardown(state);
            fx_setup(state);
        }
        f = *state;
        fx_build(f, &flight_spec);
        struct request *lead = flight_req(f, 3);
        assert_int_equal(flight_enter(lead), FLIGHT_LEAD);
        for (size_t i = 0; i < t[c].nfollowers; i++) {
            fol[i] = flight_req(f, 3);
            assert_int_equal(flight_enter(fol[i]), FLIGHT_FOLLOW);
        }
        /* flight.c only looks at whether the leader has a client; never used here */
        lead->hreq = t[c].leader_has_client ? (struct http_req *)&dummy_client : NULL;
        assert_null(flight_follower_gone(lead)); /* the leader is no follower */
        for (size_t k = 0; t[c].gone[k]; k++) {
            struct request *r = fol[t[c].gone[k] - '0'];
            struct request *orphan = flight_follower_gone(r);
            struct request *want = (int)k == t[c].orphan_at ? lead : NULL;
            if (orphan != want) {
                fail_msg("%s: departure %zu returned %p, want %p", t[c].name, k, (void *)orphan,
                         (void *)want);
            }
            assert_null(r->flight);
            assert_null(flight_follower_gone(r)); /* twice: nothing */
        }
        assert_non_null(lead->flight); /* the owner ends the leader; its flight is still there */
        lead->hreq = NULL;
        size_t left = t[c].nfollowers - strlen(t[c].gone);
        assert_int_equal(flight_has_followers(lead), left > 0);
        flight_leave(lead, false);
        assert_null(lead->flight);
        assert_int_equal(count_calls(C_FOLLOWER_FREE, NULL), left);
        assert_int_equal(ncalls, left);
    }
}

/* Without a flight everything is a no-op. */
static void
test_flight_none(void **state)
{
    struct fx *f = *state;

    fx_build(f, &flight_spec);
    struct request *r = flight_req(f, 5);
    flight_head(r, 200, NULL);
    assert_false(flight_append(r, "x", 1));
    assert_false(flight_has_followers(r));
    assert_null(flight_follower_gone(r));
    flight_leave(r, true);
    flight_feed(r);
    assert_int_equal(ncalls, 0);
    assert_int_equal(cache_mem_count(f->gw.mem), 0);
}

int
main(void)
{
    log_open(LOG_ERROR, LOG_FORMAT_TEXT, NULL); /* the breaker's warnings are expected */

    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_retryable_table),
        cmocka_unit_test(test_retryable_out_of_range),
        cmocka_unit_test(test_outcome_rules),
        cmocka_unit_test(test_end_labels),
        cmocka_unit_test(test_left_end),
        cmocka_unit_test_setup_teardown(test_submit_go_by_model, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_unknown_model, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_dialect_filter, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_cheap_not_queued, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_submit_failover_then_queue, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_submit_weighted, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_no_queue_jumping, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_pump_priority_order, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_pump_fills_every_slot, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_queue_full_displacement, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_max_queued_zero_go, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_requeue_never_refuses, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_leave, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_full_queue_refuses_idle_other_upstream, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_queues_by_destination, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_auth_blocked, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_pump_refuses_auth_blocked, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_unreachable, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_shed_held_for_higher_class, fx_setup, fx_teardown),
        cmocka_unit_test(test_first_data_baseline),
        cmocka_unit_test_setup_teardown(test_submit_skips_open_circuit, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_alternative, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_requeue_prefers_untried, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_full_untried_is_no_alternative, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_circuit_limit_count, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flight_roles, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flight_dissolve, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flight_leader_done, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flight_follower_gone, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flight_none, fx_setup, fx_teardown),
    };
    return cmocka_run_group_tests_name("request", tests, NULL, NULL);
}
