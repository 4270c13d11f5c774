/*
 * flight: coalescing of identical cacheable requests (see flight.h).
 *
 *   request A (key K) ──flight_enter──> LEAD: flight K in the table
 *   request B (key K) ──flight_enter──> FOLLOW: on K's followers
 *
 *     A's attempt ──flight_head (200)──> followers of a stream start
 *         │        ──flight_append────> K.buf grows; followers replay it
 *         │                             at their own pace (flight_feed)
 *         v
 *     A ends ──flight_leave(ok)──> the answer is stored (memory, Redis,
 *         │                        fleet told); followers finish their
 *         │                        replay, then ops.follower_end(ok)
 *         └──flight_leave(!ok), a non-200 or encoded head, or K.buf over the cap:
 *              the flight dissolves: followers that started get its end
 *              as it is (ops.follower_end(false)); the others are let go
 *              (ops.follower_free) and the first of them leads again.
 *
 *   A's client leaves while B waits: A goes on without a client (the
 *   headless leader) for B; when B's client leaves too, flight_follower_gone
 *   hands A back to its owner to end.
 *
 * Fleet mode: a new leader first claims K fleet-wide (FLIGHT_FLEET); when
 * another instance holds the claim, it waits for that instance's answer in
 * the shared cache (ops.hit) or until the claim is given up (ops.go).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "fleet.h"
#include "flight.h"
#include "gateway.h"
#include "http.h"
#include "metrics.h"
#include "reply.h"
#include "request.h"
#include "sse.h"
#include "store.h"

#define FLIGHT_BUCKETS    4096
#define CAPTURE_MAX       (2 * 1024 * 1024) /* largest response shared or cached */
#define FOLLOW_CHUNK      (64 * 1024)
#define STREAM_HIGH_WATER (256 * 1024)

enum flight_state { FL_RUNNING, FL_OK, FL_FAILED };

struct flight {
    struct flight *hnext;
    struct flight_table *t;
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

struct flight_table {
    struct flight *b[FLIGHT_BUCKETS];
    const struct flight_ops *ops;
};

struct flight_table *
flight_table_new(const struct flight_ops *ops)
{
    struct flight_table *t = calloc(1, sizeof(*t));

    if (t) {
        t->ops = ops;
    }
    return t;
}

void
flight_table_free(struct flight_table *t)
{
    free(t);
}

static size_t
bucket(const uint8_t key[CACHE_KEY_LEN])
{
    uint64_t h;

    memcpy(&h, key, sizeof(h));
    return (size_t)(h % FLIGHT_BUCKETS);
}

static struct flight *
find(struct flight_table *t, const uint8_t key[CACHE_KEY_LEN])
{
    for (struct flight *f = t->b[bucket(key)]; f; f = f->hnext) {
        if (memcmp(f->key, key, CACHE_KEY_LEN) == 0) {
            return f;
        }
    }
    return NULL;
}

static void
untable(struct flight *f)
{
    if (!f->in_table) {
        return;
    }
    struct flight **pp = &f->t->b[bucket(f->key)];
    while (*pp && *pp != f) {
        pp = &(*pp)->hnext;
    }
    if (*pp) {
        *pp = f->hnext;
    }
    f->in_table = false;
}

static void
unref(struct flight *f)
{
    if (--f->refs == 0) {
        free(f->buf);
        free(f);
    }
}

static void feed(struct request *r);

static void
feed_all(struct flight *f)
{
    for (struct request *fr = f->followers, *next; fr; fr = next) {
        next = fr->fnext;
        feed(fr);
    }
}

static void
unlink_follower(struct request *r)
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
    unref(f);
}

/* The leader lets go of its flight; callers hold F, so this never frees it. */
static void
drop_leader(struct flight *f)
{
    if (f->leader && f->leader->flight == f) {
        f->leader->flight = NULL;
        f->leader = NULL;
        f->refs--;
    }
}

/*
 * The flight can no longer be shared (not a 200, too large, or the leader
 * failed).  Followers that already replay it get its end as it is; the
 * others are let go: the first leads again.
 */
static void
dissolve(struct flight *f)
{
    const struct flight_ops *ops = f->t->ops;

    untable(f);
    if (f->state == FL_RUNNING) {
        f->state = FL_FAILED;
    }
    f->refs++; /* hold it while followers leave */
    for (struct request *fr = f->followers, *next; fr; fr = next) {
        next = fr->fnext;
        if (fr->follow_started) {
            feed(fr); /* the rest, then the end */
        } else {
            unlink_follower(fr);
            fr->may_join = true;
            ops->follower_free(fr);
        }
    }
    drop_leader(f);
    unref(f); /* the hold */
}

static void
follower_start(struct request *r, int64_t clen)
{
    const struct flight *f = r->flight;
    struct http_header h[1 + REPLY_MAX_HEADERS];
    struct reply_buf rb;
    struct reply_info ri = {.upstream = f->upstream, .cache = "MISS", .coalesced = true};

    h[0] = (struct http_header){"Content-Type", f->ctype};
    size_t nh = 1 + reply_headers(h + 1, &ri, &rb);
    r->follow_started = true;
    if (r->replied) {
        return; /* dsgate sent its own head while this one waited: the replay is the body */
    }
    r->status = f->status;
    r->sse = f->sse;
    sse_scan_init(&r->scan, f->sse);
    http_reply_start(r->hreq, f->status, h, nh, clen);
    r->replied = true;
}

/*
 * Give a follower what the leader has received so far, as fast as its
 * client takes it; once the flight is over and all is out, its end.
 */
static void
feed(struct request *r)
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
    bool ok = f->state == FL_OK;
    const struct flight_ops *ops = f->t->ops;
    unlink_follower(r);
    ops->follower_end(r, ok);
}

void
flight_feed(struct request *r)
{
    feed(r);
}

/* ---- the fleet --------------------------------------------------------------- */

/* The leader's answer is in the shared cache (or not): tell the fleet. */
struct fleet_done {
    struct fleet *fleet;
    uint8_t key[CACHE_KEY_LEN];
};

static void
fleet_store_cb(void *arg, bool ok)
{
    struct fleet_done *d = arg;

    fleet_finish(d->fleet, d->key, ok);
    free(d);
}

/* The flight ends with a cache entry: its followers get it, the leader too. */
static void
from_entry(struct request *r, struct cache_entry *e)
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
            untable(f);
            f->state = FL_OK;
            f->refs++; /* hold it while followers finish */
            feed_all(f);
            drop_leader(f);
            unref(f); /* the hold */
        }
    }
    metrics_add("dsgate_fleet_coalesced_total", NULL, 1);
    r->gw->flights->ops->hit(r, e);
}

static void
on_fleet_lookup(void *arg, struct cache_entry *e)
{
    struct request *r = arg;

    r->sget = NULL;
    if (e) {
        fleet_wait_cancel(r->fwait);
        r->fwait = NULL;
        from_entry(r, e);
        return;
    }
    if (!r->fwait) {
        r->gw->flights->ops->go(r); /* the wait is over and the answer is not there */
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
    r->gw->flights->ops->go(r);
}

static void
on_fleet_claim(void *arg, bool lead)
{
    struct request *r = arg;

    if (lead) {
        r->fwait = NULL;
        r->fleet_leader = true;
        r->gw->flights->ops->go(r);
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
    return r->fwait != NULL;
}

/* ---- the leader --------------------------------------------------------------- */

enum flight_role
flight_enter(struct request *r)
{
    struct flight_table *t = r->gw->flights;
    struct flight *f = r->may_join ? find(t, r->key) : NULL;

    if (f && f->state == FL_RUNNING) {
        r->flight = f;
        f->refs++;
        r->fnext = f->followers;
        r->fprev = NULL;
        if (f->followers) {
            f->followers->fprev = r;
        }
        f->followers = r;
        r->cache_status = CS_MISS;
        metrics_add("dsgate_coalesced_total", NULL, 1);
        return FLIGHT_FOLLOW;
    }
    if (f) {
        return FLIGHT_NONE; /* one that cannot be joined is still in the table */
    }
    f = calloc(1, sizeof(*f));
    if (!f) {
        return FLIGHT_NONE; /* not shared; still served */
    }
    memcpy(f->key, r->key, CACHE_KEY_LEN);
    f->t = t;
    f->refs = 1;
    f->leader = r;
    size_t b = bucket(r->key);
    f->hnext = t->b[b];
    t->b[b] = f;
    f->in_table = true;
    r->flight = f;
    return fleet_claim_start(r) ? FLIGHT_FLEET : FLIGHT_LEAD;
}

void
flight_head(struct request *r, int status, const char *ctype)
{
    struct flight *f = r->flight;
    /*
     * A follower or a cache hit is answered with the Content-Type only: an
     * encoded answer (which the upstream should not have sent, shared
     * requests go without Accept-Encoding) is neither shared nor stored.
     */
    bool encoded = r->att && r->att->encoded;

    if (encoded) {
        r->store_ok = false;
    }
    if (!f || f->leader != r) {
        return;
    }
    snprintf(f->ctype, sizeof(f->ctype), "%s", ctype ? ctype : "application/json");
    if (status != 200 || encoded) {
        dissolve(f);
        return;
    }
    f->head_known = true;
    f->status = status;
    f->sse = r->sse;
    snprintf(f->upstream, sizeof(f->upstream), "%s", r->att->up->conf->name);
    feed_all(f);
}

bool
flight_append(struct request *r, const char *data, size_t len)
{
    struct flight *f = r->flight;

    if (!f || f->leader != r || f->state != FL_RUNNING) {
        return false;
    }
    if (f->len + len > CAPTURE_MAX) {
        dissolve(f);
        return false;
    }
    if (f->len + len > f->cap) {
        size_t cap = f->cap ? f->cap : 16384;
        while (cap < f->len + len) {
            cap *= 2;
        }
        char *b = realloc(f->buf, cap);
        if (!b) {
            dissolve(f);
            return false;
        }
        f->buf = b;
        f->cap = cap;
    }
    memcpy(f->buf + f->len, data, len);
    f->len += len;
    feed_all(f);
    return true;
}

bool
flight_has_followers(const struct request *r)
{
    return r->flight && r->flight->leader == r && r->flight->followers;
}

/* The leader is done and its answer good: store it, finish the followers. */
static void
leader_done(struct request *r)
{
    struct flight *f = r->flight;
    struct gateway *gw = r->gw;
    const struct conf *c = gw->conf;
    bool announced = false;
    size_t start;

    untable(f);
    f->state = FL_OK;
    if (r->store_ok && cache_storable(r->dialect, f->sse, f->buf, f->len, &start)) {
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
    feed_all(f);
    drop_leader(f);
    unref(f); /* the hold */
}

void
flight_leave(struct request *r, bool ok)
{
    struct flight *f = r->flight;

    if (!f) {
        return;
    }
    if (f->leader != r) {
        unlink_follower(r);
        return;
    }
    if (!ok || !f->head_known) {
        if (r->fleet_leader) {
            fleet_finish(r->gw->fleet, r->key, false);
        }
        dissolve(f);
        return;
    }
    leader_done(r);
}

struct request *
flight_follower_gone(struct request *r)
{
    struct flight *f = r->flight;

    if (!f || f->leader == r) {
        return NULL;
    }
    struct request *orphan = NULL;
    f->refs++; /* hold it while looking */
    unlink_follower(r);
    if (f->leader && !f->leader->hreq && !f->followers) {
        orphan = f->leader; /* nobody is left to answer */
    }
    unref(f);
    return orphan;
}
