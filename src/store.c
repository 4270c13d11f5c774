/*
 * store: the Redis cache tier (see store.h), on an rlink connection.
 *
 * Only a link that is UP takes lookups; anything else is an immediate miss.
 *
 * A lookup is a struct store_get owned by hiredis' callback: hiredis calls
 * every pending callback exactly once, with a NULL reply when the
 * connection drops, so the struct is freed there and nowhere else.  Our
 * own timer answers the requester with a miss when Redis is slower than
 * the timeout and marks the lookup abandoned; the late reply is then
 * dropped.  Too many abandoned lookups mean Redis is stuck (paused,
 * SIGSTOPped): the link is reset.
 */
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "log.h"
#include "metrics.h"
#include "rlink.h"

#define MAX_PENDING   10000 /* lookups and writes waiting for Redis */
#define MAX_ABANDONED 64    /* late replies before the link is reset */

struct store {
    struct event_base *base;
    struct rlink *link;
    char prefix[128];
    int64_t timeout_ms;
    size_t pending;
    size_t abandoned;
};

struct store_get {
    struct store *s;
    store_get_fn fn;
    void *arg;
    struct event *timer;
    uint8_t key[CACHE_KEY_LEN];
    bool done;      /* the requester has had its answer or left */
    bool timed_out; /* ... because Redis was too slow */
};

static void
count_error(const char *what)
{
    metrics_addf("dsgate_cache_errors_total", 1, "tier=\"redis\",error=\"%s\"", what);
}

static void
on_link_state(void *arg, bool up)
{
    struct store *s = arg;

    if (up) {
        s->abandoned = 0;
    } else {
        count_error("disconnect");
    }
}

struct store *
store_new(struct event_base *base, const char *url, const char *prefix, int64_t timeout_ms)
{
    struct store *s = calloc(1, sizeof(*s));

    if (!s) {
        return NULL;
    }
    s->base = base;
    store_configure(s, prefix, timeout_ms);
    s->link = rlink_new(base, url, "cache", on_link_state, s);
    if (!s->link) {
        free(s);
        return NULL;
    }
    return s;
}

void
store_configure(struct store *s, const char *prefix, int64_t timeout_ms)
{
    snprintf(s->prefix, sizeof(s->prefix), "%s", prefix);
    s->timeout_ms = timeout_ms;
}

void
store_free(struct store *s)
{
    if (!s) {
        return;
    }
    rlink_free(s->link); /* pending callbacks run with NULL */
    free(s);
}

/* ---- lookups and writes ----------------------------------------------- */

static size_t
make_key(const struct store *s, const char *ns, const uint8_t key[CACHE_KEY_LEN], char *out,
         size_t outlen)
{
    char hex[2 * CACHE_KEY_LEN + 1];

    cache_key_hex(key, hex);
    return (size_t)snprintf(out, outlen, "%s%s%s", s->prefix, ns, hex);
}

static void
get_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct store_get *g = arg;
    struct store *s = g->s;

    (void)fd;
    (void)what;
    if (g->done) {
        return;
    }
    g->done = true;
    g->timed_out = true;
    count_error("timeout");
    g->fn(g->arg, NULL);
    if (++s->abandoned > MAX_ABANDONED) {
        s->abandoned = 0;
        rlink_reset(s->link);
    }
}

static void
on_get_reply(redisAsyncContext *ac, void *r, void *priv)
{
    struct store_get *g = priv;
    struct store *s = g->s;
    redisReply *reply = r;
    struct cache_entry *e = NULL;

    (void)ac;
    s->pending--;
    if (!g->done) {
        evtimer_del(g->timer);
        if (!reply) {
            /* the connection dropped */
        } else if (reply->type == REDIS_REPLY_STRING) {
            e = cache_entry_decode(g->key, reply->str, reply->len);
            if (!e) {
                count_error("garbled");
            } else if (e->expires_ms <= cache_now_ms()) {
                cache_entry_unref(e);
                e = NULL;
            }
        } else if (reply->type != REDIS_REPLY_NIL) {
            count_error("reply");
        }
        g->done = true;
        g->fn(g->arg, e);
    } else if (g->timed_out && s->abandoned > 0) {
        s->abandoned--; /* a late reply: Redis is answering again */
    }
    event_free(g->timer);
    free(g);
}

struct store_get *
store_get_ns(struct store *s, const char *ns, const uint8_t key[CACHE_KEY_LEN], store_get_fn fn,
             void *arg)
{
    char k[256];

    redisAsyncContext *ac = s ? rlink_ctx(s->link) : NULL;
    if (!ac || s->pending >= MAX_PENDING) {
        return NULL;
    }
    struct store_get *g = calloc(1, sizeof(*g));
    if (!g) {
        return NULL;
    }
    g->s = s;
    g->fn = fn;
    g->arg = arg;
    memcpy(g->key, key, CACHE_KEY_LEN);
    g->timer = evtimer_new(s->base, get_timeout_cb, g);
    size_t kl = make_key(s, ns, key, k, sizeof(k));
    const char *argv[2] = {"GET", k};
    size_t argvlen[2] = {3, kl};
    if (!g->timer || redisAsyncCommandArgv(ac, on_get_reply, g, 2, argv, argvlen) != REDIS_OK) {
        if (g->timer) {
            event_free(g->timer);
        }
        free(g);
        return NULL;
    }
    s->pending++;
    struct timeval tv = {s->timeout_ms / 1000, (s->timeout_ms % 1000) * 1000};
    evtimer_add(g->timer, &tv);
    return g;
}

struct store_get *
store_get(struct store *s, const uint8_t key[CACHE_KEY_LEN], store_get_fn fn, void *arg)
{
    return store_get_ns(s, "", key, fn, arg);
}

void
store_get_cancel(struct store_get *g)
{
    if (g && !g->done) {
        g->done = true;
        evtimer_del(g->timer);
    }
}

struct put_ctx {
    struct store *s;
    void (*fn)(void *arg, bool ok);
    void *arg;
    bool answer; /* a cache answer: counted as a store */
};

static void
on_put_reply(redisAsyncContext *ac, void *r, void *priv)
{
    struct put_ctx *pc = priv;
    redisReply *reply = r;
    bool ok = reply && reply->type != REDIS_REPLY_ERROR;

    (void)ac;
    pc->s->pending--;
    if (!ok) {
        count_error(reply ? "write" : "disconnect");
    } else if (pc->answer) {
        metrics_addf("dsgate_cache_stores_total", 1, "tier=\"redis\"");
    }
    if (pc->fn) {
        pc->fn(pc->arg, ok);
    }
    free(pc);
}

static void
put_ns(struct store *s, const char *ns, const struct cache_entry *e, int64_t ttl_ms,
       void (*fn)(void *arg, bool ok), void *arg)
{
    char k[256], ttl[24];
    size_t len;
    redisAsyncContext *ac = s ? rlink_ctx(s->link) : NULL;
    char *val = NULL;
    struct put_ctx *pc = NULL;

    if (!ac || s->pending >= MAX_PENDING || ttl_ms <= 0 || !(val = cache_entry_encode(e, &len)) ||
        !(pc = malloc(sizeof(*pc)))) {
        free(val);
        if (fn) {
            fn(arg, false);
        }
        return;
    }
    pc->s = s;
    pc->fn = fn;
    pc->arg = arg;
    pc->answer = ns[0] == '\0';
    size_t kl = make_key(s, ns, e->key, k, sizeof(k));
    int tl = snprintf(ttl, sizeof(ttl), "%lld", (long long)ttl_ms);
    const char *argv[5] = {"SET", k, val, "PX", ttl};
    size_t argvlen[5] = {3, kl, len, 2, (size_t)tl};
    if (redisAsyncCommandArgv(ac, on_put_reply, pc, 5, argv, argvlen) == REDIS_OK) {
        s->pending++;
    } else {
        free(pc);
        if (fn) {
            fn(arg, false);
        }
    }
    free(val);
}

void
store_put_then(struct store *s, const struct cache_entry *e, int64_t ttl_ms,
               void (*fn)(void *arg, bool ok), void *arg)
{
    put_ns(s, "", e, ttl_ms, fn, arg);
}

void
store_put(struct store *s, const struct cache_entry *e, int64_t ttl_ms)
{
    put_ns(s, "", e, ttl_ms, NULL, NULL);
}

void
store_put_ns(struct store *s, const char *ns, const struct cache_entry *e, int64_t ttl_ms)
{
    put_ns(s, ns, e, ttl_ms, NULL, NULL);
}
