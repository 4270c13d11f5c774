/*
 * request: the life of one proxied request.
 *
 *   request_start ──> admission (queue full: 429, or displace a lower class)
 *        │
 *        v
 *     QUEUED ──(slot free: request_pump)──> UPSTREAM ──> on_head ──> on_data ──> on_done
 *        ^  max_wait: 504                      │            │ retryable status, attempts,
 *        │                                     │            │ budget and deadline allow:
 *        │                                     │            │ discard the body
 *        └──────── BACKOFF (jittered, Retry-After) <────────┘ connect error / timeout too
 *
 *   client leaves at any point ──> leave queue / cancel timer / cancel
 *                                  transfer ──> request_finish
 *
 * The reply head goes to the client when the first non-retried response
 * head arrives.  After that a retry is still transparent as long as no data
 * byte has reached the client (SSE comments and blank keep-alive lines are
 * not data); a later failure ends an SSE reply with an error event and any
 * other reply with a closed connection, never a hang.
 *
 * Timers (one per request, by phase): QUEUE (max_wait), BACKOFF,
 * FIRST_DATA (from the start of an attempt to its first data byte) and
 * IDLE (between data pieces).
 *
 * Ownership: struct request owns its body, forwarded headers, transfer and
 * timer.  http.c's request pointer is dropped when the reply ends or the
 * client leaves; the transfer pointer when it is done or cancelled.
 * request_finish() runs once, never inside a libcurl callback.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>

#include "cache.h"
#include "fleet.h"
#include "gateway.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "retry.h"
#include "route.h"
#include "sched.h"
#include "sse.h"
#include "store.h"
#include "upstream.h"

#define STREAM_HIGH_WATER (256 * 1024) /* pause the upstream above this */
#define MAX_FWD_HEADERS   128
#define CAPTURE_MAX       (2 * 1024 * 1024) /* largest response shared or cached */
#define FOLLOW_CHUNK      (64 * 1024)
#define FLIGHT_BUCKETS    4096
#define USAGE_TAIL        8192 /* the end of an answer, where "usage" is */

enum req_timer {
    TIMER_NONE,
    TIMER_QUEUE,
    TIMER_BACKOFF,
    TIMER_FIRST_DATA,
    TIMER_IDLE,
    TIMER_DISPATCH
};

enum req_phase {
    PH_NEW,
    PH_LOOKUP,
    PH_FLEET,
    PH_FOLLOWING,
    PH_QUEUED,
    PH_BACKOFF,
    PH_UPSTREAM,
    PH_DONE
};

enum flight_state { FL_RUNNING, FL_OK, FL_FAILED };

/*
 * A cacheable request in flight, shared by identical requests: the leader
 * goes upstream and appends what it receives to BUF; followers replay BUF
 * at their own pace.  Leader and followers each hold a reference.
 */
struct fleet_done {
    struct fleet *fleet;
    uint8_t key[CACHE_KEY_LEN];
};

/* The leader's answer is in the shared cache (or not): tell the fleet. */
static void
fleet_store_cb(void *arg, bool ok)
{
    struct fleet_done *d = arg;

    fleet_finish(d->fleet, d->key, ok);
    free(d);
}

struct flight {
    struct flight *hnext;
    uint8_t key[CACHE_KEY_LEN];
    int refs;
    bool in_table;
    struct request *leader;
    struct request *followers;
    enum flight_state state;
    bool head_known;
    int status;
    bool sse;
    char ctype[128];
    char upstream[72];
    char *buf;
    size_t len, cap;
};

struct request {
    struct sched_item item; /* first: the queue links requests through it */
    struct gateway *gw;
    struct request *lprev, *lnext; /* the gateway's live requests */
    struct http_req *hreq;
    uint64_t id;
    char method[16];
    char *path;   /* copy, for the access log */
    char *target; /* path and query */
    char *url;    /* upstream base + target */
    enum prio prio;
    char *body;
    size_t body_len;
    struct gw_upstream *up;
    struct up_xfer *xfer;
    const char *fwd[MAX_FWD_HEADERS + 8];
    struct evbuffer *hstore; /* storage for the client's header lines */
    const char *chdr[MAX_FWD_HEADERS]; /* those lines, "Name: value" */
    size_t nchdr;
    bool have_ct, have_accept;
    struct event *timer;
    enum req_timer timer_kind;
    struct sse_scan scan;
    enum req_phase phase;
    int status;
    bool sse;
    bool paused;
    bool finished;
    bool slot_held;
    bool discarding; /* this attempt's answer will be retried */
    bool data_sent;  /* a data byte reached the client */
    int late_status; /* non-200 head after the reply started */
    /*
     * A non-stream answer's head waits for its first data byte, so that
     * leading keep-alive white space can be dropped and a failure before
     * data is still a clean JSON error (and a transparent retry).
     */
    struct evbuffer *dhead; /* "name\0value\0" pairs */
    size_t dhead_n;
    int64_t dhead_clen;
    bool head_deferred;
    size_t ws_dropped;
    int attempts;
    int64_t next_delay_ms; /* backoff chosen for the coming retry */
    int backoffs;          /* backoff sleeps so far */
    bool moving;           /* the coming retry goes to another upstream at once */
    int64_t prev_delay_ms;
    const char *retry_reason;
    char retry_status[8]; /* the status a retry is for, as its reason */
    int64_t queue_us;     /* time spent queued, all attempts */
    int64_t t_start_us;
    int64_t t_up_start_us;
    int64_t t_first_data_us;
    uint64_t bytes_out;
    const char *end; /* how it ended, for the access log */

    /* routing */
    char *model;     /* the client's "model", or NULL */
    json_t *doc;     /* parsed body, kept when a model may be renamed */
    uint64_t tried;  /* upstreams tried since the last backoff (bits) */
    char *send_body; /* body with the model renamed for this upstream */
    size_t send_len;
    struct model_rewrite mrw; /* answers: upstream model name -> client's */
    bool rewriting;
    bool auth_failed;         /* this attempt got 401/402/403 */
    struct evbuffer *errbody; /* its body, kept for replay while the circuit is open */

    /* token accounting from the answer's "usage" */
    char *tail; /* the last USAGE_TAIL bytes of the answer */
    size_t tail_len;
    int64_t tokens[4]; /* prompt, completion, cache hit, cache miss; -1: unknown */

    /* cache and coalescing */
    bool cacheable;           /* on a cache path with the cache enabled */
    bool lookup;              /* may be answered from the cache */
    bool store_ok;            /* its answer may be stored */
    bool may_join;            /* may follow an identical request in flight */
    const char *cache_status; /* "hit" "miss" "bypass" "none" */
    uint8_t key[CACHE_KEY_LEN];
    struct store_get *sget;
    struct fleet_wait *fwait; /* asking or waiting for another instance */
    bool fleet_leader;        /* claimed the key fleet-wide */
    bool fleet_checked;       /* the fleet was asked about this key */
    char *lease;              /* fleet lease held by the current attempt */
    struct flight *flight;
    bool headless; /* leader whose client left; goes on for followers */
    struct request *fnext, *fprev;
    size_t follow_off;
    bool follow_started;
};

static void request_finish(struct request *r);
static void head_defer_clear(struct request *r);
static void want_leases(struct gateway *gw, struct request *r);
static int forward(struct request *r, const char *data, size_t len);
static int forward_rewritten(struct request *r, const char *data, size_t len, bool flush);

/* ---- headers ------------------------------------------------------------ */

static bool
is_hop_by_hop(const char *name)
{
    static const char *const hop[] = {
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
        "TE",         "Trailer",    "Trailers",           "Transfer-Encoding",   "Upgrade",
    };
    for (size_t i = 0; i < sizeof(hop) / sizeof(hop[0]); i++) {
        if (strcasecmp(name, hop[i]) == 0) {
            return true;
        }
    }
    return strncasecmp(name, "Proxy-", 6) == 0;
}

/* Is NAME listed in the Connection header value CONN? */
static bool
named_by_connection(const char *conn, const char *name)
{
    size_t nl = strlen(name);

    if (!conn) {
        return false;
    }
    for (const char *p = conn; *p;) {
        p += strspn(p, ", \t");
        size_t tl = strcspn(p, ", \t");
        if (tl == nl && strncasecmp(p, name, nl) == 0) {
            return true;
        }
        p += tl;
    }
    return false;
}

/* Headers the gateway reads itself and never forwards. */
static bool
is_own_request_header(const char *name)
{
    return strcasecmp(name, "X-Priority") == 0;
}

/*
 * The client's headers that may go upstream, copied once when the request
 * starts: minus hop-by-hop, framing, Host and dsgate's own.  Attempts are
 * built from this copy, never from the client's request, because a leader
 * whose client left goes on for its followers without one.
 */
static int
snapshot_headers(struct request *r, const struct http_req *hr)
{
    const char *conn = http_req_header(hr, "Connection");
    size_t offs[MAX_FWD_HEADERS];
    size_t n = 0;

    r->hstore = evbuffer_new();
    if (!r->hstore) {
        return -1;
    }
    for (size_t i = 0; i < hr->nheaders && n < MAX_FWD_HEADERS; i++) {
        const char *name = hr->headers[i].name;
        if (is_hop_by_hop(name) || named_by_connection(conn, name) ||
            strcasecmp(name, "Host") == 0 || strcasecmp(name, "Content-Length") == 0 ||
            strcasecmp(name, "Expect") == 0 || is_own_request_header(name)) {
            continue;
        }
        if (r->cacheable && strcasecmp(name, "Accept-Encoding") == 0) {
            continue; /* shared and cached answers stay uncompressed */
        }
        if (strcasecmp(name, "Content-Type") == 0) {
            r->have_ct = true;
        } else if (strcasecmp(name, "Accept") == 0) {
            r->have_accept = true;
        }
        offs[n++] = evbuffer_get_length(r->hstore);
        const char *value = hr->headers[i].value;
        evbuffer_add(r->hstore, name, strlen(name));
        if (value[0]) {
            evbuffer_add(r->hstore, ": ", 2);
            evbuffer_add(r->hstore, value, strlen(value) + 1);
        } else {
            evbuffer_add(r->hstore, ";", 2); /* curl's way to send it empty */
        }
    }
    const char *base = (const char *)evbuffer_pullup(r->hstore, -1);
    for (size_t i = 0; i < n; i++) {
        r->chdr[i] = base + offs[i];
    }
    r->nchdr = n;
    return 0;
}

/*
 * The forwarded request headers for the current upstream: the client's
 * copy, with Authorization replaced when the upstream has a key.
 */
static void
build_forward_headers(struct request *r)
{
    size_t n = 0;

    for (size_t i = 0; i < r->nchdr; i++) {
        if (r->up->auth_header && strncasecmp(r->chdr[i], "Authorization", 13) == 0 &&
            (r->chdr[i][13] == ':' || r->chdr[i][13] == ';')) {
            continue;
        }
        r->fwd[n++] = r->chdr[i];
    }
    /* suppress what libcurl would add on its own */
    r->fwd[n++] = "Expect:";
    if (!r->have_ct) {
        r->fwd[n++] = "Content-Type:";
    }
    if (!r->have_accept) {
        r->fwd[n++] = "Accept:";
    }
    if (r->up->auth_header) {
        r->fwd[n++] = r->up->auth_header;
    }
    r->fwd[n] = NULL;
}

/* ---- timers, slots, queue ------------------------------------------------ */

static void
timer_arm(struct request *r, enum req_timer kind, int64_t ms)
{
    r->timer_kind = kind;
    if (kind == TIMER_NONE || ms <= 0) {
        evtimer_del(r->timer);
        r->timer_kind = TIMER_NONE;
        if (ms <= 0 && (kind == TIMER_BACKOFF || kind == TIMER_QUEUE || kind == TIMER_DISPATCH)) {
            /* due now: run it from the loop */
            r->timer_kind = kind;
            event_active(r->timer, EV_TIMEOUT, 0);
        }
        return;
    }
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(r->timer, &tv);
}

static void
slot_release(struct request *r)
{
    if (r->slot_held) {
        r->slot_held = false;
        sched_limit_release(&r->up->limit);
    }
    if (r->lease) {
        fleet_release(r->gw->fleet, r->up->fleet, r->lease);
        r->lease = NULL;
    }
}

/* The adaptive limits, local and fleet-wide, hear how an attempt went. */
static void
limit_feedback(struct request *r, bool overload)
{
    bool cut = sched_limit_feedback(&r->up->limit, overload, http_now_us());
    if (r->up->fleet && (cut || !overload)) {
        /* the fleet hears a cut when this instance's window judged overload */
        fleet_feedback(r->gw->fleet, r->up->fleet, r->up->conf->max_inflight, cut);
    }
}

static struct request *
item_request(struct sched_item *it)
{
    return (struct request *)((char *)it - offsetof(struct request, item));
}

/* Does upstream U take this request's model? */
static bool
eligible(const struct request *r, const struct gw_upstream *u)
{
    return !r->model || route_model_for(u->conf, r->model) != NULL;
}

void
request_wake_cb(evutil_socket_t fd, short what, void *arg)
{
    struct gw_upstream *u = arg;

    (void)fd;
    (void)what;
    request_pump(u->gw);
}

/* Feed an attempt's outcome to its upstream's circuit breaker. */
static void
circuit_result(struct request *r, enum route_outcome o, const char *reason)
{
    struct gw_upstream *u = r->up;
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

/*
 * When every eligible upstream is shut by 401/402/403, waiting will not
 * help: the upstream whose answer the client should get, else NULL.
 */
static struct gw_upstream *
auth_blocked(struct request *r)
{
    struct gw_upstream *answer = NULL;
    int64_t now = http_now_us();

    for (size_t i = 0; i < r->gw->nups; i++) {
        struct gw_upstream *u = r->gw->ups[i];
        if (!eligible(r, u)) {
            continue;
        }
        if (!u->circuit.auth || circuit_usable(&u->circuit, now)) {
            return NULL;
        }
        if (!answer && u->auth_body) {
            answer = u;
        }
    }
    return answer;
}

static void
reply_auth_blocked(struct request *r, struct gw_upstream *u)
{
    struct http_header h[4];
    char st[8];

    snprintf(st, sizeof(st), "%d", u->auth_status);
    h[0] = (struct http_header){"Content-Type", "application/json"};
    h[1] = (struct http_header){"X-Dsgate-Attempts", "0"};
    h[2] = (struct http_header){"X-Dsgate-Queue-Ms", "0"};
    h[3] = (struct http_header){"X-Dsgate-Upstream", u->conf->name};
    r->status = u->auth_status;
    r->end = "circuit_open";
    if (r->hreq) {
        http_reply(r->hreq, u->auth_status, h, 4, u->auth_body, u->auth_body_len);
        r->hreq = NULL;
    }
}

/* Is there an eligible upstream, other than those tried, whose circuit lets a request through? */
static bool
alternative_exists(struct request *r)
{
    int64_t now = http_now_us();

    for (size_t i = 0; i < r->gw->nups; i++) {
        struct gw_upstream *u = r->gw->ups[i];
        if (!(r->tried & ((uint64_t)1 << i)) && eligible(r, u) &&
            circuit_usable(&u->circuit, now)) {
            return true;
        }
    }
    return false;
}

/*
 * The upstream to use now, or NULL when every candidate is at its limit or
 * its circuit is open.  Untried upstreams first (a retry moves on).
 */
static struct gw_upstream *
pick_upstream(struct gateway *gw, struct request *r)
{
    size_t cand[ROUTE_MAX_UPSTREAMS], n = 0, fresh[ROUTE_MAX_UPSTREAMS], nf = 0;
    int weights[ROUTE_MAX_UPSTREAMS];
    int64_t now = http_now_us();

    for (size_t i = 0; i < gw->nups; i++) {
        struct gw_upstream *u = gw->ups[i];
        weights[i] = u->conf->weight;
        if (!eligible(r, u) || !circuit_usable(&u->circuit, now) ||
            !sched_limit_available(&u->limit) ||
            (fleet_active(gw->fleet) && !fleet_lease_ready(u->fleet))) {
            continue;
        }
        cand[n++] = i;
        if (!(r->tried & ((uint64_t)1 << i))) {
            fresh[nf++] = i;
        }
    }
    if (n == 0) {
        return NULL;
    }
    const size_t *set = nf > 0 ? fresh : cand;
    size_t ns = nf > 0 ? nf : n;
    if (gw->conf->routing == ROUTING_FAILOVER || ns == 1) {
        return gw->ups[set[0]];
    }
    int64_t cur[ROUTE_MAX_UPSTREAMS];
    for (size_t i = 0; i < gw->nups; i++) {
        cur[i] = gw->ups[i]->swrr;
    }
    size_t k = route_swrr_pick(cur, weights, set, ns);
    for (size_t i = 0; i < gw->nups; i++) {
        gw->ups[i]->swrr = cur[i];
    }
    return gw->ups[k];
}

void
request_update_gauges(struct gateway *gw)
{
    static const char *const pn[] = {"high", "medium", "low"};

    for (int p = 0; p < PRIO_COUNT; p++) {
        metrics_setf("dsgate_queue_depth", (double)gw->queue.depth[p], "priority=\"%s\"", pn[p]);
    }
    for (size_t i = 0; i < gw->nups; i++) {
        const struct gw_upstream *u = gw->ups[i];
        metrics_setf("dsgate_inflight", u->limit.inflight, "upstream=\"%s\"", u->conf->name);
        metrics_setf("dsgate_concurrency_limit", sched_limit_current(&u->limit), "upstream=\"%s\"",
                     u->conf->name);
        metrics_setf("dsgate_circuit_open", u->circuit.state == CIRCUIT_OPEN ? 1 : 0,
                     "upstream=\"%s\"", u->conf->name);
    }
}

static void
send_sse_error(struct request *r, const char *code, const char *message)
{
    char buf[512];

    if (!r->hreq) {
        return;
    }
    /* close any half-sent line or event first, so the error stands alone */
    int n = snprintf(buf, sizeof(buf),
                     "%sevent: error\ndata: {\"error\":{\"message\":\"%s\","
                     "\"type\":\"upstream_error\",\"code\":\"%s\"}}\n\n",
                     r->scan.mid_line ? "\n\n" : (r->scan.mid_event ? "\n" : ""), message, code);
    http_reply_data(r->hreq, buf, (size_t)n);
}

static void
reply_error(struct request *r, int status, const char *type, const char *code, const char *message)
{
    char attempts[16], queue_ms[24];
    struct http_header h[3];
    size_t nh = 0;

    snprintf(attempts, sizeof(attempts), "%d", r->attempts);
    snprintf(queue_ms, sizeof(queue_ms), "%lld", (long long)(r->queue_us / 1000));
    h[nh++] = (struct http_header){"X-Dsgate-Attempts", attempts};
    h[nh++] = (struct http_header){"X-Dsgate-Queue-Ms", queue_ms};
    if (r->attempts > 0) {
        h[nh++] = (struct http_header){"X-Dsgate-Upstream", r->up->conf->name};
    }
    r->status = status;
    http_reply_error_h(r->hreq, status, type, code, message, h, nh);
    r->hreq = NULL;
}

/* The request failed: tell the client in the best way still open to us. */
static void
fail(struct request *r, int status, const char *code, const char *message, const char *end)
{
    r->end = end;
    if (!r->hreq) {
        return;
    }
    if (!http_reply_started(r->hreq)) {
        reply_error(r, status, status == 429 ? "rate_limit_error" : "upstream_error", code,
                    message);
    } else if (r->sse) {
        send_sse_error(r, code, message);
        http_reply_end(r->hreq, false);
        r->hreq = NULL;
    } else {
        http_reply_end(r->hreq, true); /* an incomplete body must not look complete */
        r->hreq = NULL;
    }
}

static void attempt(struct request *r, struct gw_upstream *up);

/* ---- coalescing ------------------------------------------------------------ */

static void dispatch(struct request *r);
static void follower_feed(struct request *r);

/* Give every follower what it can take now. */
static void
flight_feed_all(struct flight *f)
{
    for (struct request *fr = f->followers, *next; fr; fr = next) {
        next = fr->fnext;
        follower_feed(fr);
    }
}

static size_t
flight_bucket(const uint8_t key[CACHE_KEY_LEN])
{
    uint64_t h;

    memcpy(&h, key, sizeof(h));
    return (size_t)(h % FLIGHT_BUCKETS);
}

static struct flight *
flight_find(struct gateway *gw, const uint8_t key[CACHE_KEY_LEN])
{
    for (struct flight *f = gw->flights[flight_bucket(key)]; f; f = f->hnext) {
        if (memcmp(f->key, key, CACHE_KEY_LEN) == 0) {
            return f;
        }
    }
    return NULL;
}

static void
flight_untable(struct gateway *gw, struct flight *f)
{
    if (!f->in_table) {
        return;
    }
    struct flight **pp = &gw->flights[flight_bucket(f->key)];
    while (*pp && *pp != f) {
        pp = &(*pp)->hnext;
    }
    if (*pp) {
        *pp = f->hnext;
    }
    f->in_table = false;
}

static void
flight_unref(struct flight *f)
{
    if (--f->refs == 0) {
        free(f->buf);
        free(f);
    }
}

/* R becomes the leader of a new flight for its key. */
static void
flight_lead(struct request *r)
{
    struct gateway *gw = r->gw;
    struct flight *f = calloc(1, sizeof(*f));

    if (!f) {
        return; /* not shared; still served */
    }
    memcpy(f->key, r->key, CACHE_KEY_LEN);
    f->refs = 1;
    f->leader = r;
    size_t b = flight_bucket(r->key);
    f->hnext = gw->flights[b];
    gw->flights[b] = f;
    f->in_table = true;
    r->flight = f;
}

static void
follower_unlink(struct request *r)
{
    struct flight *f = r->flight;

    if (r->fprev) {
        r->fprev->fnext = r->fnext;
    } else if (f->followers == r) {
        f->followers = r->fnext;
    }
    if (r->fnext) {
        r->fnext->fprev = r->fprev;
    }
    r->fnext = r->fprev = NULL;
    r->flight = NULL;
    flight_unref(f);
}

static void
follower_join(struct request *r, struct flight *f)
{
    r->flight = f;
    f->refs++;
    r->fnext = f->followers;
    r->fprev = NULL;
    if (f->followers) {
        f->followers->fprev = r;
    }
    f->followers = r;
    r->phase = PH_FOLLOWING;
    r->cache_status = "miss";
    metrics_add("dsgate_coalesced_total", NULL, 1);
    follower_feed(r);
}

/*
 * The flight can no longer be shared (not a 200, too large, or the leader
 * failed).  Followers that already replay it get its end as it is; the
 * others go their own way from the loop: the first leads again.
 */
static void
flight_dissolve(struct flight *f, struct gateway *gw)
{
    flight_untable(gw, f);
    if (f->state == FL_RUNNING) {
        f->state = FL_FAILED;
    }
    f->refs++; /* hold it while followers leave */
    for (struct request *fr = f->followers, *next; fr; fr = next) {
        next = fr->fnext;
        if (fr->follow_started) {
            follower_feed(fr); /* the rest, then the end; may finish it */
        } else {
            follower_unlink(fr);
            fr->may_join = true;
            fr->phase = PH_NEW;
            timer_arm(fr, TIMER_DISPATCH, 0);
        }
    }
    if (f->leader && f->leader->flight == f) {
        f->leader->flight = NULL;
        f->leader = NULL;
        f->refs--; /* the leader's; the hold above keeps F */
    }
    flight_unref(f); /* the hold */
}

static void
flight_append(struct flight *f, struct gateway *gw, const char *data, size_t len)
{
    if (f->state != FL_RUNNING) {
        return;
    }
    if (f->len + len > CAPTURE_MAX) {
        flight_dissolve(f, gw);
        return;
    }
    if (f->len + len > f->cap) {
        size_t cap = f->cap ? f->cap : 16384;
        while (cap < f->len + len) {
            cap *= 2;
        }
        char *b = realloc(f->buf, cap);
        if (!b) {
            flight_dissolve(f, gw);
            return;
        }
        f->buf = b;
        f->cap = cap;
    }
    memcpy(f->buf + f->len, data, len);
    f->len += len;
    flight_feed_all(f);
}

static void
follower_start(struct request *r, int64_t clen)
{
    const struct flight *f = r->flight;
    struct http_header h[6];
    size_t nh = 0;

    h[nh++] = (struct http_header){"Content-Type", f->ctype};
    h[nh++] = (struct http_header){"X-Cache", "MISS"};
    h[nh++] = (struct http_header){"X-Dsgate-Coalesced", "1"};
    h[nh++] = (struct http_header){"X-Dsgate-Attempts", "0"};
    h[nh++] = (struct http_header){"X-Dsgate-Queue-Ms", "0"};
    h[nh++] = (struct http_header){"X-Dsgate-Upstream", f->upstream};
    r->status = f->status;
    r->sse = f->sse;
    sse_scan_init(&r->scan, f->sse);
    http_reply_start(r->hreq, f->status, h, nh, clen);
    r->follow_started = true;
}

/*
 * Give a follower what the leader has received so far, as fast as its
 * client takes it; end its reply once the flight is over and all is out.
 */
static void
follower_feed(struct request *r)
{
    struct flight *f = r->flight;

    if (!f || !r->hreq || !f->head_known) {
        return;
    }
    if (!r->follow_started) {
        if (f->sse && f->state != FL_FAILED) {
            follower_start(r, -1);
        } else if (f->state == FL_OK) {
            /* like the leader's client: without leading keep-alive white space */
            while (r->follow_off < f->len &&
                   (f->buf[r->follow_off] == ' ' || f->buf[r->follow_off] == '\t' ||
                    f->buf[r->follow_off] == '\r' || f->buf[r->follow_off] == '\n')) {
                r->follow_off++;
            }
            follower_start(r, (int64_t)(f->len - r->follow_off));
        } else {
            return; /* wait for the whole answer */
        }
    }
    while (r->follow_off < f->len && http_reply_pending(r->hreq) < STREAM_HIGH_WATER) {
        size_t n = f->len - r->follow_off;
        n = n < FOLLOW_CHUNK ? n : FOLLOW_CHUNK;
        if (sse_scan_feed(&r->scan, f->buf + r->follow_off, n)) {
            r->data_sent = true;
        }
        http_reply_data(r->hreq, f->buf + r->follow_off, n);
        r->follow_off += n;
        r->bytes_out += n;
    }
    if (r->follow_off < f->len || f->state == FL_RUNNING) {
        return;
    }
    if (f->state == FL_OK) {
        r->end = "coalesced";
    } else {
        fail(r, 502, "upstream_reset", "upstream failed while serving an identical request",
             "coalesced_failed");
    }
    if (r->hreq) {
        http_reply_end(r->hreq, false);
        r->hreq = NULL;
    }
    follower_unlink(r);
    request_finish(r);
}

/* The leader's final head: followers of a stream start now. */
static void
flight_head(struct request *r, int status)
{
    struct flight *f = r->flight;

    if (!f) {
        return;
    }
    if (status != 200) {
        flight_dissolve(f, r->gw);
        return;
    }
    f->head_known = true;
    f->status = status;
    f->sse = r->sse;
    snprintf(f->upstream, sizeof(f->upstream), "%s", r->up->conf->name);
    flight_feed_all(f);
}

/* The leader is done: store a good answer, finish or release followers. */
static void
flight_finish(struct request *r, bool ok)
{
    struct flight *f = r->flight;
    struct gateway *gw = r->gw;
    const struct conf *c = gw->conf;

    if (!f) {
        return;
    }
    bool announced = false;
    if (!ok || !f->head_known) {
        if (r->fleet_leader) {
            fleet_finish(gw->fleet, r->key, false);
        }
        flight_dissolve(f, gw);
        return;
    }
    flight_untable(gw, f);
    f->state = FL_OK;
    size_t start;
    if (r->store_ok && cache_storable(f->sse, f->buf, f->len, &start)) {
        struct cache_entry *e = cache_entry_new(r->key, f->sse, f->ctype, f->buf + start,
                                                f->len - start, cache_now_ms() + c->cache.ttl_ms);
        if (e) {
            if (c->cache.max_entries > 0) {
                cache_mem_put(gw->mem, e);
                metrics_addf("dsgate_cache_stores_total", 1, "tier=\"memory\"");
            }
            struct fleet_done *d = r->fleet_leader ? malloc(sizeof(*d)) : NULL;
            if (d) {
                /* announce only once the shared cache has the answer */
                d->fleet = gw->fleet;
                memcpy(d->key, r->key, CACHE_KEY_LEN);
                store_put_then(gw->store, e, c->cache.ttl_ms, fleet_store_cb, d);
                announced = true;
            } else {
                store_put(gw->store, e, c->cache.ttl_ms);
            }
            cache_entry_unref(e);
        }
    }
    if (r->fleet_leader && !announced) {
        fleet_finish(gw->fleet, r->key, false);
    }
    f->refs++;
    flight_feed_all(f);
    f->leader = NULL;
    r->flight = NULL;
    f->refs--;       /* the leader's; the hold above keeps F */
    flight_unref(f); /* the hold */
}

/* ---- cache hits ---------------------------------------------------------- */

static void
entry_release(void *arg)
{
    cache_entry_unref(arg);
}

/* Answer from a cache entry (takes the reference). */
static void
reply_entry(struct request *r, struct cache_entry *e, const char *tier)
{
    struct http_header h[5];
    size_t nh = 0;

    h[nh++] = (struct http_header){"Content-Type", e->ctype};
    h[nh++] = (struct http_header){"X-Cache", "HIT"};
    h[nh++] = (struct http_header){"X-Dsgate-Attempts", "0"};
    h[nh++] = (struct http_header){"X-Dsgate-Queue-Ms", "0"};
    r->status = 200;
    r->cache_status = "hit";
    r->end = "cache_hit";
    r->bytes_out = e->body_len;
    metrics_addf("dsgate_cache_hits_total", 1, "tier=\"%s\"", tier);
    http_reply_start(r->hreq, 200, h, nh, (int64_t)e->body_len);
    http_reply_data_ref(r->hreq, e->body, e->body_len, entry_release, e);
    http_reply_end(r->hreq, false);
    r->hreq = NULL;
}

static void
on_store_reply(void *arg, struct cache_entry *e)
{
    struct request *r = arg;

    r->sget = NULL;
    if (e) {
        if (r->gw->conf->cache.max_entries > 0) {
            cache_mem_put(r->gw->mem, e); /* promote */
        }
        reply_entry(r, e, "redis");
        request_finish(r);
        return;
    }
    metrics_add("dsgate_cache_misses_total", NULL, 1);
    dispatch(r);
}

/* Do requests for the same upstreams (SIG) wait already? */
static bool
queued_for(const struct gateway *gw, uint64_t sig)
{
    for (unsigned i = 0; i < SCHED_GROUPS; i++) {
        if (gw->queue.g[i].used && gw->queue.g[i].sig == sig) {
            return true;
        }
    }
    return gw->queue.g[SCHED_GROUPS - 1].used; /* the shared overflow queue */
}

/* Wait for a slot: at once if one is free and nobody waits, else queue. */
static void
enqueue(struct request *r)
{
    struct gateway *gw = r->gw;
    int64_t now = http_now_us();

    uint64_t sig = 0;
    for (size_t i = 0; i < gw->nups; i++) {
        if (eligible(r, gw->ups[i])) {
            sig |= (uint64_t)1 << i;
        }
    }
    if (gw->queue.total == 0 || !queued_for(gw, sig)) {
        struct gw_upstream *up = pick_upstream(gw, r);
        if (up) {
            metrics_observe("dsgate_queue_wait_seconds", NULL, 0);
            attempt(r, up);
            return;
        }
    }
    sched_set_push(&gw->queue, &r->item, sig, r->prio, now);
    r->phase = PH_QUEUED;
    int64_t left_ms = gw->conf->queue.max_wait_ms - r->queue_us / 1000;
    timer_arm(r, TIMER_QUEUE, left_ms > 0 ? left_ms : 0);
    if (fleet_active(gw->fleet)) {
        want_leases(gw, r);
    }
}

static void
dequeued(struct request *r, int64_t now)
{
    sched_set_remove(&r->gw->queue, &r->item);
    int64_t waited = now - r->item.t_enq_us;
    r->queue_us += waited;
    metrics_observe("dsgate_queue_wait_seconds", NULL, (double)waited / 1e6);
    timer_arm(r, TIMER_NONE, 0);
}

/* In fleet mode: ask for leases for the upstreams the next request could use. */
static void
want_leases(struct gateway *gw, struct request *r)
{
    int64_t now = http_now_us();

    for (size_t i = 0; i < gw->nups; i++) {
        struct gw_upstream *u = gw->ups[i];
        if (u->fleet && eligible(r, u) && circuit_usable(&u->circuit, now) &&
            sched_limit_available(&u->limit) && !fleet_lease_ready(u->fleet)) {
            fleet_want(gw->fleet, u->fleet, u->conf->max_inflight, gw->queue.total);
        }
    }
}

void
request_pump(struct gateway *gw)
{
    int64_t now = http_now_us();

    for (;;) {
        struct sched_item *heads[SCHED_GROUPS];
        size_t n = sched_set_heads(&gw->queue, now, gw->conf->queue.aging_ms * 1000, heads);
        bool moved = false;
        for (size_t i = 0; i < n && !moved; i++) {
            struct request *r = item_request(heads[i]);
            struct gw_upstream *up = pick_upstream(gw, r);
            struct gw_upstream *blocked = up ? NULL : auth_blocked(r);
            if (up) {
                dequeued(r, now);
                attempt(r, up);
                moved = true;
            } else if (blocked) {
                dequeued(r, now);
                reply_auth_blocked(r, blocked);
                request_finish(r);
                moved = true;
            } else if (fleet_active(gw->fleet)) {
                want_leases(gw, r);
            }
        }
        if (!moved) {
            break;
        }
    }
    fleet_trim(gw->fleet);
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

    if (r->data_sent || (!r->hreq && !r->headless) || r->attempts >= c->retry.max_attempts ||
        r->gw->draining) {
        return false;
    }
    /* another upstream that has not failed this request goes at once */
    r->tried |= (uint64_t)1 << r->up->idx;
    bool move = alternative_exists(r);
    int64_t delay = 0;
    if (!move) {
        delay = retry_backoff_ms(c->retry.jitter, c->retry.base_ms, c->retry.cap_ms, r->backoffs,
                                 r->prev_delay_ms, retry_random);
        if (retry_after_ms > delay) {
            delay = retry_after_ms < c->retry.cap_ms ? retry_after_ms : c->retry.cap_ms;
        }
    }
    int64_t deadline = r->t_start_us + c->queue.max_wait_ms * 1000;
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
    metrics_addf("dsgate_retries_total", 1, "upstream=\"%s\",reason=\"%s\"", r->up->conf->name,
                 reason);
    log_msg(LOG_DEBUG, "req=%llu up=%s: retry %d in %lld ms (%s)", (unsigned long long)r->id,
            r->up->conf->name, r->attempts, (long long)r->next_delay_ms, reason);
    if (!r->moving) {
        /* every candidate failed: back off, then all may be tried again */
        r->prev_delay_ms = r->next_delay_ms;
        r->backoffs++;
        r->tried = 0;
    }
    head_defer_clear(r);
    r->phase = PH_BACKOFF;
    r->discarding = false;
    r->status = 0;
    timer_arm(r, TIMER_BACKOFF, r->next_delay_ms);
}

/* The outcome label of an attempt that got an answer with STATUS. */
static const char *
status_outcome(int status)
{
    if (status < 400) {
        return "ok";
    }
    if (status == 429 || status == 503) {
        return status == 429 ? "429" : "503";
    }
    if (status == 401 || status == 402 || status == 403) {
        return "auth";
    }
    return status < 500 ? "4xx" : "5xx";
}

static void
count_attempt(struct request *r, const char *outcome)
{
    struct gw_upstream *u = r->up;

    for (size_t i = 0; i < u->n_m_attempts; i++) {
        if (u->m_attempts[i].outcome == outcome) {
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
                 r->up->conf->name, outcome);
}

static void
timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct request *r = arg;
    struct gateway *gw = r->gw;
    enum req_timer kind = r->timer_kind;

    (void)fd;
    (void)what;
    r->timer_kind = TIMER_NONE;
    switch (kind) {
    case TIMER_NONE:
        return;
    case TIMER_QUEUE:
        dequeued(r, http_now_us());
        fail(r, 504, "queue_timeout", "request waited longer than queue.max_wait", "queue_timeout");
        request_finish(r);
        return;
    case TIMER_BACKOFF:
        enqueue(r);
        return;
    case TIMER_DISPATCH:
        dispatch(r);
        return;
    case TIMER_FIRST_DATA:
    case TIMER_IDLE:
        break;
    }
    /* an upstream deadline */
    if (r->xfer) {
        upstream_cancel(r->xfer);
        r->xfer = NULL;
    }
    slot_release(r);
    limit_feedback(r, true);
    count_attempt(r, "timeout");
    circuit_result(r, ROUTE_FAILURE, kind == TIMER_FIRST_DATA ? "timeout" : "idle");
    if (kind == TIMER_FIRST_DATA && r->gw->conf->retry.on_timeout && can_retry(r, 0)) {
        schedule_retry(r, "timeout");
    } else if (kind == TIMER_FIRST_DATA) {
        fail(r, 504, "upstream_timeout", "upstream sent no data within timeouts.first_data",
             "upstream_timeout");
        request_finish(r);
    } else {
        fail(r, 504, "upstream_idle_timeout", "upstream stream idle beyond timeouts.idle",
             "upstream_idle");
        request_finish(r);
    }
    request_pump(gw);
}

/* ---- upstream callbacks ------------------------------------------------- */

static void
head_defer_clear(struct request *r)
{
    if (r->dhead) {
        evbuffer_free(r->dhead);
        r->dhead = NULL;
    }
    r->head_deferred = false;
    r->dhead_n = 0;
    r->ws_dropped = 0;
}

/* Keep a head to send when the first data byte arrives. */
static void
head_defer(struct request *r, const struct http_header *h, size_t n, int64_t clen)
{
    head_defer_clear(r);
    r->dhead = evbuffer_new();
    if (!r->dhead) {
        http_reply_start(r->hreq, r->status, h, n, clen);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        evbuffer_add(r->dhead, h[i].name, strlen(h[i].name) + 1);
        evbuffer_add(r->dhead, h[i].value, strlen(h[i].value) + 1);
    }
    r->dhead_n = n;
    r->dhead_clen = clen;
    r->head_deferred = true;
}

static void
head_send(struct request *r)
{
    struct http_header h[MAX_FWD_HEADERS + 8];
    const char *p = (const char *)evbuffer_pullup(r->dhead, -1);

    for (size_t i = 0; i < r->dhead_n; i++) {
        h[i].name = p;
        p += strlen(p) + 1;
        h[i].value = p;
        p += strlen(p) + 1;
    }
    /* white space was dropped: the upstream's length no longer holds */
    http_reply_start(r->hreq, r->status, h, r->dhead_n, r->ws_dropped ? -1 : r->dhead_clen);
    head_defer_clear(r);
}

/* Record the answer's kind in the flight, for followers and the cache. */
static void
flight_note_type(struct request *r, const char *ctype)
{
    if (r->flight) {
        snprintf(r->flight->ctype, sizeof(r->flight->ctype), "%s",
                 ctype ? ctype : "application/json");
    }
}

static int
on_head(void *arg, int status, const struct http_header *hdrs, size_t n)
{
    struct request *r = arg;
    struct http_header out[MAX_FWD_HEADERS + 5];
    size_t no = 0;
    int64_t clen = -1;
    const char *conn = NULL, *retry_after = NULL, *ctype = NULL;
    char attempts[16], queue_ms[24];

    if (!r->hreq && !r->headless) {
        return UP_ABORT;
    }
    bool overload = status == 429 || status == 503 || status == 504;
    limit_feedback(r, overload);
    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(hdrs[i].name, "Connection") == 0) {
            conn = hdrs[i].value;
        } else if (strcasecmp(hdrs[i].name, "Retry-After") == 0) {
            retry_after = hdrs[i].value;
        } else if (strcasecmp(hdrs[i].name, "Content-Type") == 0) {
            ctype = hdrs[i].value;
        }
    }
    r->status = status;
    enum route_outcome oc = route_classify_status(status);
    char reason[8];
    snprintf(reason, sizeof(reason), "%d", status);
    circuit_result(r, oc, reason);
    if (oc == ROUTE_AUTH_FAILURE) {
        /* the account is at fault here: another upstream may still serve */
        r->auth_failed = true;
        if (!r->errbody) {
            r->errbody = evbuffer_new();
        }
        r->tried |= (uint64_t)1 << r->up->idx;
        if (alternative_exists(r) && can_retry(r, 0)) {
            r->discarding = true;
            r->retry_reason = "auth";
            return UP_CONTINUE;
        }
    }
    if (retry_on_status(r->gw->conf, status)) {
        int64_t ra = retry_after_ms(retry_after, time(NULL));
        if (can_retry(r, ra)) {
            r->discarding = true; /* read and drop the body; keeps the connection */
            snprintf(r->retry_status, sizeof(r->retry_status), "%d", status);
            r->retry_reason = r->retry_status;
            return UP_CONTINUE;
        }
    }
    bool started = r->hreq ? http_reply_started(r->hreq) : (r->flight && r->flight->head_known);
    if (started) {
        /* an earlier attempt already started the answer with keep-alives */
        if (status != 200) {
            r->late_status = status;
            return UP_ABORT;
        }
        return UP_CONTINUE;
    }
    r->sse = ctype && strncasecmp(ctype, "text/event-stream", 17) == 0;
    sse_scan_init(&r->scan, r->sse);
    flight_note_type(r, ctype);
    if (!r->hreq) {
        /* headless leader: only followers want this answer */
        flight_head(r, status);
        return r->flight ? UP_CONTINUE : UP_ABORT;
    }
    for (size_t i = 0; i < n && no < MAX_FWD_HEADERS; i++) {
        const char *name = hdrs[i].name;
        if (strcasecmp(name, "Content-Length") == 0) {
            char *e;
            errno = 0;
            long long v = strtoll(hdrs[i].value, &e, 10);
            if (errno == 0 && e != hdrs[i].value && *e == '\0' && v >= 0) {
                clen = v;
            }
            continue;
        }
        if (is_hop_by_hop(name) || named_by_connection(conn, name)) {
            continue;
        }
        out[no++] = hdrs[i];
    }
    if (r->rewriting) {
        clen = -1; /* the model name changes the length */
    }
    snprintf(attempts, sizeof(attempts), "%d", r->attempts);
    snprintf(queue_ms, sizeof(queue_ms), "%lld", (long long)(r->queue_us / 1000));
    out[no++] = (struct http_header){"X-Dsgate-Attempts", attempts};
    out[no++] = (struct http_header){"X-Dsgate-Queue-Ms", queue_ms};
    out[no++] = (struct http_header){"X-Dsgate-Upstream", r->up->conf->name};
    if (r->cacheable) {
        out[no++] = (struct http_header){"X-Cache", r->store_ok ? "MISS" : "BYPASS"};
    }
    if (r->sse) {
        http_reply_start(r->hreq, status, out, no, -1); /* events go as they come */
    } else {
        head_defer(r, out, no, clen);
    }
    flight_head(r, status);
    return UP_CONTINUE;
}

static int
on_data(void *arg, const char *data, size_t len)
{
    struct request *r = arg;

    if (r->auth_failed && r->errbody && evbuffer_get_length(r->errbody) + len <= 8192) {
        evbuffer_add(r->errbody, data, len);
    }
    if (r->discarding) {
        return UP_CONTINUE;
    }
    if (!r->hreq && !r->headless) {
        return UP_ABORT;
    }
    if (r->hreq && http_reply_pending(r->hreq) > STREAM_HIGH_WATER) {
        r->paused = true;
        return UP_PAUSE;
    }
    if (sse_scan_feed(&r->scan, data, len)) {
        if (r->t_first_data_us == 0) {
            r->t_first_data_us = http_now_us();
        }
        r->data_sent = true;
        timer_arm(r, TIMER_IDLE, r->up->conf->idle_ms);
    }
    if (r->rewriting) {
        return forward_rewritten(r, data, len, false);
    }
    return forward(r, data, len);
}

static void
tail_keep(struct request *r, const char *data, size_t len)
{
    if (!r->tail) {
        return;
    }
    if (len >= USAGE_TAIL) {
        memcpy(r->tail, data + len - USAGE_TAIL, USAGE_TAIL);
        r->tail_len = USAGE_TAIL;
        return;
    }
    if (r->tail_len + len > USAGE_TAIL) {
        size_t drop = r->tail_len + len - USAGE_TAIL;
        memmove(r->tail, r->tail + drop, r->tail_len - drop);
        r->tail_len -= drop;
    }
    memcpy(r->tail + r->tail_len, data, len);
    r->tail_len += len;
}

static const char *const token_kinds[4] = {"prompt", "completion", "prompt_cache_hit",
                                           "prompt_cache_miss"};

/*
 * Find the last "usage" object in the answer's tail (the body of a
 * non-stream answer, the final chunk of a stream) and count its tokens.
 */
static void
usage_account(struct request *r)
{
    static const char *const fields[4] = {"prompt_tokens", "completion_tokens",
                                          "prompt_cache_hit_tokens", "prompt_cache_miss_tokens"};
    const char *t = r->tail, *found = NULL;

    if (!t || r->tail_len < 8) {
        return;
    }
    for (const char *p = t; (p = memmem(p, r->tail_len - (size_t)(p - t), "\"usage\"", 7));
         p += 7) {
        found = p;
    }
    if (!found) {
        return;
    }
    const char *end = t + r->tail_len;
    const char *o = memchr(found + 7, '{', (size_t)(end - found - 7));
    if (!o) {
        return;
    }
    int depth = 0;
    bool str = false;
    const char *q = o;
    for (; q < end; q++) {
        if (str) {
            if (*q == '\\') {
                q++;
            } else if (*q == '"') {
                str = false;
            }
        } else if (*q == '"') {
            str = true;
        } else if (*q == '{') {
            depth++;
        } else if (*q == '}' && --depth == 0) {
            break;
        }
    }
    if (q >= end) {
        return;
    }
    /* "field" : digits, looked up in the object's bytes (no parse needed) */
    for (int i = 0; i < 4; i++) {
        char pat[40];
        int pl = snprintf(pat, sizeof(pat), "\"%s\"", fields[i]);
        const char *f = memmem(o, (size_t)(q - o), pat, (size_t)pl);
        if (!f) {
            continue;
        }
        f += pl;
        while (f < q && (*f == ' ' || *f == '\t' || *f == '\n' || *f == '\r')) {
            f++;
        }
        if (f >= q || *f++ != ':') {
            continue;
        }
        while (f < q && (*f == ' ' || *f == '\t' || *f == '\n' || *f == '\r')) {
            f++;
        }
        int64_t v = 0;
        int digits = 0;
        while (f < q && *f >= '0' && *f <= '9' && digits < 15) {
            v = v * 10 + (*f++ - '0');
            digits++;
        }
        if (digits == 0) {
            continue;
        }
        r->tokens[i] = v;
        struct gw_upstream *u = r->up;
        if (!u->m_tokens[i]) {
            char labels[160];
            snprintf(labels, sizeof(labels), "upstream=\"%s\",kind=\"%s\"", u->conf->name,
                     token_kinds[i]);
            u->m_tokens[i] = metrics_series("dsgate_tokens_total", labels);
        }
        metrics_series_add(u->m_tokens[i], (double)v);
    }
}

/* Pass answer bytes on: to the flight (followers, cache) and the client. */
static int
forward(struct request *r, const char *data, size_t len)
{
    tail_keep(r, data, len);
    if (r->flight) {
        flight_append(r->flight, r->gw, data, len);
        if (r->headless && !r->flight) {
            return UP_ABORT; /* too large to share; nobody else wants it */
        }
    }
    if (r->hreq && r->head_deferred) {
        size_t ws = 0;
        while (ws < len &&
               (data[ws] == ' ' || data[ws] == '\t' || data[ws] == '\r' || data[ws] == '\n')) {
            ws++;
        }
        r->ws_dropped += ws;
        data += ws;
        len -= ws;
        if (len == 0) {
            return UP_CONTINUE;
        }
        head_send(r);
    }
    if (r->hreq) {
        http_reply_data(r->hreq, data, len);
        r->bytes_out += len;
    }
    return UP_CONTINUE;
}

static int
forward_rewritten(struct request *r, const char *data, size_t len, bool flush)
{
    struct evbuffer *b = evbuffer_new();
    int rc = UP_CONTINUE;

    if (!b) {
        return UP_ABORT;
    }
    if (len > 0) {
        model_rewrite_feed(&r->mrw, data, len, b);
    }
    if (flush) {
        model_rewrite_flush(&r->mrw, b);
    }
    size_t n = evbuffer_get_length(b);
    if (n > 0) {
        rc = forward(r, (const char *)evbuffer_pullup(b, -1), n);
    }
    evbuffer_free(b);
    return rc;
}

static void
on_done(void *arg, enum up_result res, const char *detail)
{
    struct request *r = arg;
    struct gateway *gw = r->gw;
    const struct conf *c = r->gw->conf;
    const char *name = r->up->conf->name;

    r->xfer = NULL;
    timer_arm(r, TIMER_NONE, 0);
    slot_release(r);
    if (r->auth_failed && res == UP_OK && r->errbody) {
        /* keep the account's answer to replay while its circuit is open */
        struct gw_upstream *u = r->up;
        size_t n = evbuffer_get_length(r->errbody);
        char *b = malloc(n + 1);
        if (b) {
            evbuffer_remove(r->errbody, b, n);
            free(u->auth_body);
            u->auth_body = b;
            u->auth_body_len = n;
            u->auth_status = r->status;
        }
    }
    if (res == UP_OK && r->discarding) {
        count_attempt(r, status_outcome(r->status));
        schedule_retry(r, r->retry_reason);
        request_pump(r->gw);
        return;
    }
    bool before_data = !r->data_sent && r->hreq;
    switch (res) {
    case UP_OK:
        count_attempt(r, status_outcome(r->status));
        r->end = "completed";
        if (r->rewriting) {
            forward_rewritten(r, NULL, 0, true);
        }
        if (r->status == 200) {
            usage_account(r);
        }
        if (r->hreq && r->head_deferred) {
            head_send(r); /* an empty (or all white space) body */
        }
        if (r->hreq) {
            if (!http_reply_started(r->hreq)) {
                /* curl saw a complete answer whose head we never passed on */
                fail(r, 502, "upstream_reset", "upstream answer had no head", "upstream_reset");
            } else {
                http_reply_end(r->hreq, false);
                r->hreq = NULL;
            }
        }
        break;
    case UP_CONNECT:
        count_attempt(r, "connect_error");
        circuit_result(r, ROUTE_FAILURE, "connect");
        log_msg(LOG_WARN, "req=%llu up=%s: cannot reach upstream: %s", (unsigned long long)r->id,
                name, detail);
        if (c->retry.on_connect && can_retry(r, 0)) {
            schedule_retry(r, "connect");
            request_pump(r->gw);
            return;
        }
        fail(r, 502, "upstream_unreachable", "upstream unreachable", "upstream_unreachable");
        break;
    case UP_TIMEOUT:
        count_attempt(r, "timeout");
        circuit_result(r, ROUTE_FAILURE, "timeout");
        limit_feedback(r, true);
        log_msg(LOG_WARN, "req=%llu up=%s: upstream timed out: %s", (unsigned long long)r->id, name,
                detail);
        if (before_data && c->retry.on_timeout && can_retry(r, 0)) {
            schedule_retry(r, "timeout");
            request_pump(r->gw);
            return;
        }
        fail(r, 504, "upstream_timeout", "upstream timed out", "upstream_timeout");
        break;
    case UP_BROKEN:
        count_attempt(r, "broken");
        circuit_result(r, ROUTE_FAILURE, "broken");
        log_msg(LOG_WARN, "req=%llu up=%s: upstream broke: %s", (unsigned long long)r->id, name,
                detail);
        if ((r->discarding || (before_data && !http_reply_started(r->hreq))) &&
            c->retry.on_connect && can_retry(r, 0)) {
            schedule_retry(r, "broken");
            request_pump(r->gw);
            return;
        }
        fail(r, 502, "upstream_reset", "upstream connection broke", "upstream_reset");
        break;
    case UP_ABORTED:
        if (r->late_status) {
            count_attempt(r, status_outcome(r->late_status));
            char msg[96];
            snprintf(msg, sizeof(msg), "upstream answered %d after the stream had started",
                     r->late_status);
            fail(r, 502, "upstream_error", msg, "upstream_error");
        } else {
            count_attempt(r, "client_closed");
            circuit_result(r, ROUTE_NEUTRAL, "");
            if (!r->end) {
                r->end = "client_closed";
            }
        }
        break;
    }
    request_finish(r);
    request_pump(gw);
}

static const struct up_callbacks up_cb = {on_head, on_data, on_done};

/* ---- client callbacks --------------------------------------------------- */

static void
on_client_close(void *arg)
{
    struct request *r = arg;
    struct gateway *gw = r->gw;
    bool freed_slot = r->slot_held;

    r->hreq = NULL;
    if (r->flight && r->flight->leader == r && r->flight->followers) {
        /* identical requests wait on this one: go on without a client */
        r->headless = true;
        if (r->paused && r->xfer) {
            r->paused = false;
            upstream_pause(r->xfer, false);
        }
        return;
    }
    if (!r->end) {
        switch (r->phase) {
        case PH_QUEUED:
            r->end = "client_closed_queued";
            break;
        case PH_BACKOFF:
            r->end = "client_closed_backoff";
            break;
        case PH_LOOKUP:
        case PH_FLEET:
        case PH_FOLLOWING:
            r->end = "client_closed_waiting";
            break;
        default:
            r->end = r->data_sent ? "client_closed_streaming" : "client_closed_waiting";
        }
    }
    if (r->phase == PH_QUEUED) {
        dequeued(r, http_now_us());
    }
    if (r->xfer) {
        upstream_cancel(r->xfer);
        r->xfer = NULL;
        count_attempt(r, "client_closed");
        circuit_result(r, ROUTE_NEUTRAL, "");
    }
    struct request *orphan = NULL;
    if (r->flight && r->flight->leader != r) {
        struct flight *f = r->flight;
        follower_unlink(r);
        if (f->leader && f->leader->headless && !f->followers) {
            orphan = f->leader; /* nobody is left to answer */
        }
    }
    request_finish(r);
    if (orphan) {
        orphan->end = "client_closed_waiting";
        request_finish(orphan);
        freed_slot = true;
    }
    if (freed_slot) {
        request_pump(gw);
    }
}

static void
on_client_drain(void *arg)
{
    struct request *r = arg;

    if (r->phase == PH_FOLLOWING) {
        follower_feed(r);
        return;
    }
    if (r->paused && r->xfer) {
        r->paused = false;
        upstream_pause(r->xfer, false); /* may deliver data right here */
    }
}

/* ---- lifecycle ---------------------------------------------------------- */

static void
access_log(struct request *r)
{
    struct evbuffer *b;
    int64_t now = http_now_us();

    if (!log_enabled(LOG_INFO) || !(b = evbuffer_new())) {
        return;
    }
    evbuffer_add_printf(b, "{\"id\":%llu,\"method\":\"", (unsigned long long)r->id);
    log_json_escape(b, r->method);
    evbuffer_add_printf(b, "\",\"path\":\"");
    log_json_escape(b, r->path);
    evbuffer_add_printf(
        b,
        "\",\"status\":%d,\"priority\":\"%s\",\"cache\":\"%s\","
        "\"upstream\":\"%s\",\"attempts\":%d,\"queue_ms\":%lld,"
        "\"upstream_ms\":%lld,\"first_data_ms\":%lld,\"total_ms\":%lld,"
        "\"bytes_in\":%zu,\"bytes_out\":%llu,\"tokens_prompt\":%lld,"
        "\"tokens_completion\":%lld,\"tokens_cache_hit\":%lld,\"end\":\"%s\"}",
        r->status, conf_priority_name(r->prio), r->cache_status,
        r->attempts ? r->up->conf->name : "", r->attempts, (long long)(r->queue_us / 1000),
        (long long)(r->t_up_start_us ? (now - r->t_up_start_us) / 1000 : 0),
        (long long)(r->t_first_data_us ? (r->t_first_data_us - r->t_start_us) / 1000 : -1),
        (long long)((now - r->t_start_us) / 1000), r->body_len, (unsigned long long)r->bytes_out,
        (long long)r->tokens[0], (long long)r->tokens[1], (long long)r->tokens[2],
        r->end ? r->end : "completed");
    size_t len = evbuffer_get_length(b);
    log_access((const char *)evbuffer_pullup(b, -1), len);
    evbuffer_free(b);
}

static void
count_request(const struct request *r)
{
    /* series handles by (code, priority, cache): formatted once each */
    static struct {
        int code;
        enum prio prio;
        const char *cache;
        struct metric_series *s;
    } seen[256];
    static struct metric_series *duration;
    int code = r->status ? r->status : 499;
    unsigned h = ((unsigned)code * 31u + (unsigned)r->prio * 7u +
                  (unsigned)((uintptr_t)r->cache_status >> 3)) % 256u;

    if (!(seen[h].s && seen[h].code == code && seen[h].prio == r->prio &&
          seen[h].cache == r->cache_status)) {
        char labels[96];
        snprintf(labels, sizeof(labels), "code=\"%d\",priority=\"%s\",cache=\"%s\"", code,
                 conf_priority_name(r->prio), r->cache_status);
        seen[h].code = code;
        seen[h].prio = r->prio;
        seen[h].cache = r->cache_status;
        seen[h].s = metrics_series("dsgate_requests_total", labels);
    }
    metrics_series_add(seen[h].s, 1);
    if (!duration) {
        duration = metrics_series("dsgate_request_duration_seconds", NULL);
    }
    metrics_series_observe(duration, (double)(http_now_us() - r->t_start_us) / 1e6);
}

void
request_note_reject(const struct http_req *req, enum prio prio, int status, const char *end)
{
    struct request tmp;

    memset(&tmp, 0, sizeof(tmp));
    tmp.id = req->id;
    snprintf(tmp.method, sizeof(tmp.method), "%s", req->method ? req->method : "-");
    tmp.path = (char *)(req->path ? req->path : "-");
    tmp.status = status;
    tmp.prio = prio;
    tmp.cache_status = "none";
    tmp.t_start_us = req->t_start_us ? req->t_start_us : http_now_us();
    tmp.body_len = req->body_len;
    tmp.end = end;
    tmp.tokens[0] = tmp.tokens[1] = tmp.tokens[2] = tmp.tokens[3] = -1;
    access_log(&tmp);
    count_request(&tmp);
}

static void
request_finish(struct request *r)
{
    if (r->finished) {
        return;
    }
    r->finished = true;
    r->phase = PH_DONE;
    if (r->item.queued) {
        sched_set_remove(&r->gw->queue, &r->item);
    }
    if (r->sget) {
        store_get_cancel(r->sget);
        r->sget = NULL;
    }
    if (r->fwait) {
        fleet_wait_cancel(r->fwait);
        r->fwait = NULL;
    }
    head_defer_clear(r);
    if (r->flight) {
        if (r->flight->leader == r) {
            flight_finish(r, r->status == 200 && r->end && strcmp(r->end, "completed") == 0);
        } else {
            follower_unlink(r);
        }
    }
    if (r->xfer) {
        upstream_cancel(r->xfer);
        r->xfer = NULL;
    }
    if (r->hreq) {
        /* should not happen: every path ends the reply before finishing */
        http_reply_end(r->hreq, true);
        r->hreq = NULL;
    }
    slot_release(r);
    access_log(r);
    count_request(r);
    r->gw->live_requests--;
    if (r->lprev) {
        r->lprev->lnext = r->lnext;
    } else {
        r->gw->live = r->lnext;
    }
    if (r->lnext) {
        r->lnext->lprev = r->lprev;
    }
    if (r->timer) {
        event_free(r->timer);
    }
    if (r->hstore) {
        evbuffer_free(r->hstore);
    }
    free(r->body);
    free(r->path);
    free(r->target);
    free(r->url);
    if (r->up) {
        gw_upstream_unref(r->up);
    }
    free(r->model);
    free(r->tail);
    free(r->send_body);
    json_decref(r->doc);
    if (r->rewriting) {
        model_rewrite_free(&r->mrw);
    }
    if (r->errbody) {
        evbuffer_free(r->errbody);
    }
    free(r);
}

/*
 * An upstream with a models map gets its own name for the model: the body
 * is re-serialised for it (the only case), and its answers are rewritten
 * back to the client's name.
 */
static int
rename_model(struct request *r)
{
    free(r->send_body);
    r->send_body = NULL;
    if (r->rewriting) {
        model_rewrite_free(&r->mrw);
        r->rewriting = false;
    }
    const char *to = r->model ? route_model_for(r->up->conf, r->model) : NULL;
    if (!to || strcmp(to, r->model) == 0 || !r->doc) {
        return 0;
    }
    json_t *copy = json_copy(r->doc);
    if (!copy || json_object_set_new(copy, "model", json_string(to)) < 0) {
        json_decref(copy);
        return -1;
    }
    r->send_body = json_dumps(copy, JSON_COMPACT);
    json_decref(copy);
    if (!r->send_body) {
        return -1;
    }
    r->send_len = strlen(r->send_body);
    if (model_rewrite_init(&r->mrw, to, r->model) < 0) {
        return -1;
    }
    r->rewriting = true;
    return 0;
}

static void
attempt(struct request *r, struct gw_upstream *up)
{
    const struct conf_upstream *uc;
    int64_t now = http_now_us();

    if (r->up != up || !r->url) {
        /* the URL and the forwarded headers depend on the upstream */
        free(r->url);
        size_t ul = strlen(up->conf->url) + strlen(r->target) + 1;
        r->url = malloc(ul);
        if (!r->url) {
            fail(r, 500, "out_of_memory", "out of memory", "internal_error");
            request_finish(r);
            return;
        }
        snprintf(r->url, ul, "%s%s", up->conf->url, r->target);
        gw_upstream_ref(up);
        if (r->up) {
            gw_upstream_unref(r->up);
        }
        r->up = up;
        build_forward_headers(r);
        if (rename_model(r) < 0) {
            fail(r, 500, "out_of_memory", "out of memory", "internal_error");
            request_finish(r);
            return;
        }
    }
    uc = up->conf;
    struct up_request rq = {
        .method = r->method,
        .url = r->url,
        .headers = r->fwd,
        .body = r->send_body ? r->send_body : r->body,
        .body_len = r->send_body ? r->send_len : r->body_len,
        .connect_ms = uc->connect_ms,
        .total_ms = uc->total_ms,
        .ca_file = uc->ca_file,
        .insecure = uc->insecure,
    };

    if (r->attempts == 0) {
        retry_budget_first(&r->gw->budget, now / 1000000);
    }
    r->attempts++;
    r->phase = PH_UPSTREAM;
    r->t_up_start_us = now;
    r->xfer = upstream_start(r->gw->up, &rq, &up_cb, r);
    if (!r->xfer) {
        fail(r, 502, "upstream_unreachable", "cannot start upstream transfer", "internal_error");
        request_finish(r);
        return;
    }
    sched_limit_acquire(&up->limit);
    if (fleet_active(r->gw->fleet) && up->fleet) {
        r->lease = fleet_take(up->fleet);
    }
    circuit_on_send(&up->circuit);
    r->slot_held = true;
    r->auth_failed = false;
    timer_arm(r, TIMER_FIRST_DATA, uc->first_data_ms);
}

static bool
any_eligible(const struct request *r)
{
    for (size_t i = 0; i < r->gw->nups; i++) {
        if (eligible(r, r->gw->ups[i])) {
            return true;
        }
    }
    return false;
}

/* Could this request start now (without choosing)? */
static bool
slot_free(struct gateway *gw, const struct request *r)
{
    int64_t now = http_now_us();

    for (size_t i = 0; i < gw->nups; i++) {
        struct gw_upstream *u = gw->ups[i];
        if (eligible(r, u) && circuit_usable(&u->circuit, now) &&
            sched_limit_available(&u->limit)) {
            return true;
        }
    }
    return false;
}

/* 404 naming the models the configured upstreams take. */
static void
reply_unknown_model(struct request *r)
{
    struct evbuffer *b = evbuffer_new();
    const char *list = "";

    if (b) {
        for (size_t i = 0; i < r->gw->nups; i++) {
            const struct conf_upstream *u = r->gw->ups[i]->conf;
            for (size_t j = 0; j < u->nmodels; j++) {
                evbuffer_add_printf(b, "%s%s", evbuffer_get_length(b) ? ", " : "",
                                    u->models[j].from);
            }
        }
        evbuffer_add(b, "", 1);
        list = (const char *)evbuffer_pullup(b, -1);
    }
    char msg[1024];
    snprintf(msg, sizeof(msg), "The model `%s` does not exist; available models: %s", r->model,
             list);
    r->status = 404;
    r->end = "unknown_model";
    http_reply_error(r->hreq, 404, "invalid_request_error", "model_not_found", msg);
    r->hreq = NULL;
    if (b) {
        evbuffer_free(b);
    }
}

static void admit(struct request *r);

/*
 * Fleet-wide coalescing.  The local leader of a cacheable request asks the
 * fleet whether another instance is already on this key; if so it waits
 * for that answer in the shared cache, and its own followers with it.
 */
/* The flight ends with a cache entry: its followers get it, the leader too. */
static void
flight_from_entry(struct request *r, struct cache_entry *e)
{
    struct flight *f = r->flight;

    if (f && f->len == 0) {
        char *b = malloc(e->body_len ? e->body_len : 1);
        if (b) {
            memcpy(b, e->body, e->body_len);
            free(f->buf);
            f->buf = b;
            f->len = f->cap = e->body_len;
            f->head_known = true;
            f->status = 200;
            f->sse = e->sse;
            snprintf(f->ctype, sizeof(f->ctype), "%s", e->ctype);
            snprintf(f->upstream, sizeof(f->upstream), "%s", "cache");
            flight_untable(r->gw, f);
            f->state = FL_OK;
            f->refs++; /* hold it while followers finish */
            flight_feed_all(f);
            f->leader = NULL;
            r->flight = NULL;
            f->refs--;       /* the leader's; the hold keeps F */
            flight_unref(f); /* the hold */
        }
    }
    reply_entry(r, e, "redis");
    metrics_add("dsgate_fleet_coalesced_total", NULL, 1);
    request_finish(r);
}

static void
on_fleet_lookup(void *arg, struct cache_entry *e)
{
    struct request *r = arg;

    r->sget = NULL;
    if (e) {
        fleet_wait_cancel(r->fwait);
        r->fwait = NULL;
        flight_from_entry(r, e);
        return;
    }
    if (!r->fwait) {
        admit(r); /* the wait is over and the answer is not there */
    }
}

static void
on_fleet_done(void *arg, bool done)
{
    struct request *r = arg;

    r->fwait = NULL;
    if (r->sget) {
        return; /* a lookup is running; it decides */
    }
    if (done) {
        r->sget = store_get(r->gw->store, r->key, on_fleet_lookup, r);
        if (r->sget) {
            return;
        }
    }
    admit(r);
}

static void
on_fleet_claim(void *arg, bool lead)
{
    struct request *r = arg;

    if (lead) {
        r->fwait = NULL;
        r->fleet_leader = true;
        admit(r);
        return;
    }
    /* another instance is on it: wait for its answer, and look now in case it is in */
    fleet_wait(r->fwait, r->gw->conf->fleet.lease_ttl_ms, on_fleet_done);
    r->sget = store_get(r->gw->store, r->key, on_fleet_lookup, r);
}

static bool
fleet_claim_start(struct request *r)
{
    struct gateway *gw = r->gw;

    if (!gw->store || !fleet_active(gw->fleet) || r->fleet_checked) {
        return false;
    }
    r->fleet_checked = true;
    r->fwait = fleet_claim(gw->fleet, r->key, gw->conf->fleet.lease_ttl_ms, on_fleet_claim, r);
    if (!r->fwait) {
        return false;
    }
    r->phase = PH_FLEET;
    return true;
}

/* Shared by identical requests, queued, or refused: the way upstream. */
static void
dispatch(struct request *r)
{
    struct gateway *gw = r->gw;

    if (!r->hreq) {
        request_finish(r);
        return;
    }
    if (!any_eligible(r)) {
        reply_unknown_model(r);
        request_finish(r);
        return;
    }
    struct gw_upstream *blocked = auth_blocked(r);
    if (blocked) {
        reply_auth_blocked(r, blocked);
        request_finish(r);
        return;
    }
    if (r->cacheable && r->store_ok) {
        struct flight *f = r->may_join ? flight_find(gw, r->key) : NULL;
        if (f && f->state == FL_RUNNING) {
            follower_join(r, f);
            return;
        }
        if (!f) {
            flight_lead(r);
            if (r->flight && fleet_claim_start(r)) {
                return;
            }
        }
    }
    admit(r);
}

/* Into the queue, unless it is full: then refuse, or shed a lower class. */
static void
admit(struct request *r)
{
    struct gateway *gw = r->gw;

    /* admission: a full queue refuses, or sheds its newest lower-class request */
    if (gw->queue.total >= (size_t)gw->conf->queue.max_queued &&
        !(gw->queue.total == 0 && slot_free(gw, r))) {
        struct sched_item *victim = sched_set_victim(&gw->queue, r->prio);
        if (!victim) {
            metrics_addf("dsgate_queue_rejected_total", 1, "reason=\"full\"");
            fail(r, 429, "queue_full", "too many requests waiting; retry later", "queue_full");
            request_finish(r);
            return;
        }
        struct request *v = item_request(victim);
        dequeued(v, http_now_us());
        metrics_addf("dsgate_queue_rejected_total", 1, "reason=\"displaced\"");
        fail(v, 429, "queue_full", "displaced by a higher-priority request; retry later",
             "queue_displaced");
        request_finish(v);
    }
    enqueue(r);
}

void
request_cache_directives(const struct http_req *hreq, bool *no_store, bool *no_cache)
{
    const char *cc = http_req_header(hreq, "Cache-Control");

    *no_store = *no_cache = false;
    if (!cc) {
        return;
    }
    for (const char *p = cc; *p;) {
        p += strspn(p, ", \t");
        size_t n = strcspn(p, ", \t");
        if (n == 8 && strncasecmp(p, "no-store", 8) == 0) {
            *no_store = true;
        } else if (n == 8 && strncasecmp(p, "no-cache", 8) == 0) {
            *no_cache = true;
        }
        p += n;
    }
}

/* A request object for HREQ, counted and linked; NULL when out of memory (answered). */
static struct request *
request_new(struct gateway *gw, struct http_req *hreq, enum prio prio)
{
    struct request *r = calloc(1, sizeof(*r));

    if (!r) {
        http_reply_error(hreq, 500, "internal_error", "out_of_memory", "out of memory");
        return NULL;
    }
    r->gw = gw;
    r->hreq = hreq;
    r->id = hreq->id;
    r->prio = prio;
    r->t_start_us = hreq->t_start_us;
    r->cache_status = "none";
    r->tokens[0] = r->tokens[1] = r->tokens[2] = r->tokens[3] = -1;
    snprintf(r->method, sizeof(r->method), "%s", hreq->method);
    r->path = strdup(hreq->path);
    r->target = strdup(hreq->target);
    gw->live_requests++;
    r->lnext = gw->live;
    if (gw->live) {
        gw->live->lprev = r;
    }
    gw->live = r;
    if (!r->path || !r->target) {
        fail(r, 500, "out_of_memory", "out of memory", "internal_error");
        request_finish(r);
        return NULL;
    }
    return r;
}

/* The client's credential in the cache key, or NULL (cache.shared). */
static const char *
cache_credential(const struct gateway *gw, const struct http_req *hreq)
{
    return gw->conf->cache.shared ? NULL : http_req_header(hreq, "Authorization");
}

int
request_raw_key(struct gateway *gw, const struct http_req *hreq, uint8_t key[CACHE_KEY_LEN])
{
    return cache_raw_key(gw->cache_group, hreq->method, hreq->target, hreq->body, hreq->body_len,
                         cache_credential(gw, hreq), key);
}

bool
request_known_key(struct gateway *gw, const struct http_req *hreq, uint8_t key[CACHE_KEY_LEN])
{
    uint8_t raw[CACHE_KEY_LEN];

    return cache_raw_key(gw->cache_group, hreq->method, hreq->target, hreq->body,
                         hreq->body_len, cache_credential(gw, hreq), raw) == 0 &&
           cache_alias_get(gw->mem, raw, key);
}

void
request_start(struct gateway *gw, struct http_req *hreq, enum prio prio, const void *doc,
              bool cache_path, const uint8_t *known_key)
{
    const struct conf *c = gw->conf;
    struct request *r = request_new(gw, hreq, prio);

    if (!r) {
        return;
    }
    r->timer = evtimer_new(gw->base, timer_cb, r);
    if (!r->timer) {
        fail(r, 500, "out_of_memory", "out of memory", "internal_error");
        request_finish(r);
        return;
    }
    http_req_set_callbacks(hreq, on_client_close, on_client_drain, r);

    if (cache_path && c->cache.enabled) {
        bool no_store, no_cache;
        request_cache_directives(hreq, &no_store, &no_cache);
        r->cacheable = true;
        r->store_ok = !no_store;
        r->lookup = !no_store && !no_cache;
        r->may_join = r->lookup;
        r->cache_status = no_store ? "bypass" : "miss";
        const char *cred = cache_credential(gw, hreq);
        uint8_t raw[CACHE_KEY_LEN];
        if (r->store_ok && known_key) {
            memcpy(r->key, known_key, CACHE_KEY_LEN); /* these bytes were keyed before */
        } else if (r->store_ok && (!doc || cache_key(gw->cache_group, r->method, r->target, doc,
                                                     cred, r->key) < 0)) {
            r->store_ok = r->lookup = r->may_join = false;
            r->cache_status = "bypass";
        } else if (r->store_ok && cache_raw_key(gw->cache_group, r->method, r->target, hreq->body,
                                                hreq->body_len, cred, raw) == 0) {
            cache_alias_put(gw->mem, raw, r->key); /* the same bytes again skip the parse */
        }
    }
    if (snapshot_headers(r, hreq) < 0) {
        fail(r, 500, "out_of_memory", "out of memory", "internal_error");
        request_finish(r);
        return;
    }
    r->body = http_req_take_body(hreq, &r->body_len);
    if (cache_path) {
        r->tail = malloc(USAGE_TAIL); /* no tokens counted if this fails */
    }
    const json_t *model = doc ? json_object_get(doc, "model") : NULL;
    if (json_is_string(model)) {
        r->model = strdup(json_string_value(model));
        if (gw->has_aliases) {
            r->doc = json_incref((json_t *)doc);
        }
    }

    if (r->lookup) {
        struct cache_entry *e = cache_mem_get(gw->mem, r->key, cache_now_ms());
        if (e) {
            reply_entry(r, e, "memory");
            request_finish(r);
            return;
        }
        r->sget = store_get(gw->store, r->key, on_store_reply, r);
        if (r->sget) {
            r->phase = PH_LOOKUP;
            return;
        }
        metrics_add("dsgate_cache_misses_total", NULL, 1);
    }
    dispatch(r);
}

int
request_cache_setup(struct gateway *gw)
{
    gw->flights = calloc(FLIGHT_BUCKETS, sizeof(*gw->flights));
    return gw->flights ? 0 : -1;
}

void
request_cache_free(struct gateway *gw)
{
    free(gw->flights);
    gw->flights = NULL;
}

void
request_shutdown(struct gateway *gw)
{
    gw->draining = true;
    while (gw->live) {
        struct request *r = gw->live;
        if (r->phase == PH_QUEUED) {
            dequeued(r, http_now_us());
        }
        if (r->xfer) {
            upstream_cancel(r->xfer);
            r->xfer = NULL;
        }
        r->headless = false;
        fail(r, 503, "shutting_down", "dsgate is shutting down; retry", "shutdown");
        request_finish(r);
    }
}
