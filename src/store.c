/*
 * store: the Redis cache tier (see store.h).
 *
 * Connection states: DOWN (a reconnect timer is armed, with backoff from
 * 100 ms to 5 s), CONNECTING, UP.  Only UP takes lookups; anything else is
 * an immediate miss.
 *
 * A lookup is a struct store_get owned by hiredis' callback: hiredis calls
 * every pending callback exactly once, with a NULL reply when the
 * connection drops, so the struct is freed there and nowhere else.  Our
 * own timer answers the requester with a miss when Redis is slower than
 * the timeout and marks the lookup abandoned; the late reply is then
 * dropped.  Too many abandoned lookups mean Redis is stuck (paused,
 * SIGSTOPped): the connection is dropped and re-established.
 */
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "log.h"
#include "metrics.h"

#define RECONNECT_MIN_MS   100
#define RECONNECT_MAX_MS   5000
#define MAX_PENDING        10000   /* lookups and writes waiting for Redis */
#define MAX_ABANDONED      64      /* late replies before the link is reset */

enum store_state { ST_DOWN, ST_CONNECTING, ST_UP };

struct store {
    struct event_base *base;
    redisAsyncContext *ac;
    enum store_state state;
    struct event *reconnect;
    int64_t backoff_ms;
    char host[256];
    int port;
    char unix_path[256];
    char user[128];
    char password[256];         /* secret: never logged */
    int db;
    char prefix[128];
    int64_t timeout_ms;
    size_t pending;
    size_t abandoned;
    bool freeing;
};

struct store_get {
    struct store *s;
    store_get_fn fn;
    void *arg;
    struct event *timer;
    uint8_t key[CACHE_KEY_LEN];
    bool done;                  /* the requester has had its answer or left */
};

static void store_connect(struct store *s);

static void
count_error(const char *what)
{
    metrics_addf("dsgate_cache_errors_total", 1, "tier=\"redis\",error=\"%s\"", what);
}

/* ---- connection ------------------------------------------------------- */

static void
reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    store_connect(arg);
}

static void
schedule_reconnect(struct store *s)
{
    if (s->freeing) {
        return;
    }
    s->state = ST_DOWN;
    struct timeval tv = { s->backoff_ms / 1000, (s->backoff_ms % 1000) * 1000 };
    evtimer_add(s->reconnect, &tv);
    s->backoff_ms = s->backoff_ms * 2 > RECONNECT_MAX_MS ? RECONNECT_MAX_MS : s->backoff_ms * 2;
}

static void
on_connect(const redisAsyncContext *ac, int status)
{
    struct store *s = ac->data;

    if (status != REDIS_OK) {
        log_msg(LOG_WARN, "redis: connect failed: %s", ac->errstr);
        s->ac = NULL;               /* hiredis frees the context */
        count_error("connect");
        schedule_reconnect(s);
        return;
    }
    log_msg(LOG_INFO, "redis: connected");
    s->state = ST_UP;
    s->backoff_ms = RECONNECT_MIN_MS;
    s->abandoned = 0;
}

static void
on_disconnect(const redisAsyncContext *ac, int status)
{
    struct store *s = ac->data;

    if (status != REDIS_OK && !s->freeing) {
        log_msg(LOG_WARN, "redis: connection lost: %s", ac->errstr);
        count_error("disconnect");
    }
    s->ac = NULL;
    schedule_reconnect(s);
}

static void
on_setup_reply(redisAsyncContext *ac, void *r, void *priv)
{
    redisReply *reply = r;

    (void)priv;
    if (reply && reply->type == REDIS_REPLY_ERROR) {
        log_msg(LOG_WARN, "redis: AUTH/SELECT refused");
        count_error("auth");
        redisAsyncDisconnect(ac);
    }
}

static void
store_connect(struct store *s)
{
    redisAsyncContext *ac;

    s->state = ST_CONNECTING;
    ac = s->unix_path[0] ? redisAsyncConnectUnix(s->unix_path) : redisAsyncConnect(s->host, s->port);
    if (!ac || ac->err) {
        log_msg(LOG_WARN, "redis: cannot connect: %s", ac ? ac->errstr : "out of memory");
        if (ac) {
            redisAsyncFree(ac);
        }
        count_error("connect");
        schedule_reconnect(s);
        return;
    }
    ac->data = s;
    s->ac = ac;
    redisLibeventAttach(ac, s->base);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    /* commands queue until the connection is up */
    if (s->password[0]) {
        if (s->user[0]) {
            redisAsyncCommand(ac, on_setup_reply, NULL, "AUTH %s %s", s->user, s->password);
        } else {
            redisAsyncCommand(ac, on_setup_reply, NULL, "AUTH %s", s->password);
        }
    }
    if (s->db > 0) {
        redisAsyncCommand(ac, on_setup_reply, NULL, "SELECT %d", s->db);
    }
}

/* redis://[[user]:password@]host[:port][/db] or unix:///path */
static int
parse_url(struct store *s, const char *url)
{
    const char *p;

    if (strncmp(url, "unix://", 7) == 0) {
        snprintf(s->unix_path, sizeof(s->unix_path), "%s", url + 7);
        return s->unix_path[0] ? 0 : -1;
    }
    if (strncmp(url, "rediss://", 9) == 0) {
        log_msg(LOG_ERROR, "redis: rediss:// (TLS) needs a hiredis built with TLS; this build "
                           "has none");
        return -1;
    }
    if (strncmp(url, "redis://", 8) != 0) {
        return -1;
    }
    p = url + 8;
    const char *at = strchr(p, '@');
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon) {
            snprintf(s->user, sizeof(s->user), "%.*s", (int)(colon - p), p);
            snprintf(s->password, sizeof(s->password), "%.*s", (int)(at - colon - 1), colon + 1);
        } else {
            snprintf(s->password, sizeof(s->password), "%.*s", (int)(at - p), p);
        }
        p = at + 1;
    }
    const char *slash = strchr(p, '/');
    size_t hl = slash ? (size_t)(slash - p) : strlen(p);
    char hostport[256];
    snprintf(hostport, sizeof(hostport), "%.*s", (int)hl, p);
    s->port = 6379;
    char *colon = strrchr(hostport, ':');
    if (colon && !strchr(colon, ']')) {
        s->port = atoi(colon + 1);
        *colon = '\0';
    }
    char *h = hostport;
    if (h[0] == '[') {
        h++;
        h[strcspn(h, "]")] = '\0';
    }
    snprintf(s->host, sizeof(s->host), "%s", h[0] ? h : "127.0.0.1");
    s->db = slash && slash[1] ? atoi(slash + 1) : 0;
    return s->port > 0 && s->port < 65536 ? 0 : -1;
}

struct store *
store_new(struct event_base *base, const char *url, const char *prefix, int64_t timeout_ms)
{
    struct store *s = calloc(1, sizeof(*s));

    if (!s) {
        return NULL;
    }
    s->base = base;
    s->backoff_ms = RECONNECT_MIN_MS;
    store_configure(s, prefix, timeout_ms);
    s->reconnect = evtimer_new(base, reconnect_cb, s);
    if (!s->reconnect || parse_url(s, url) < 0) {
        log_msg(LOG_ERROR, "redis: cannot use cache.redis.url");
        store_free(s);
        return NULL;
    }
    store_connect(s);
    return s;
}

void
store_configure(struct store *s, const char *prefix, int64_t timeout_ms)
{
    snprintf(s->prefix, sizeof(s->prefix), "%s", prefix);
    s->timeout_ms = timeout_ms;
}

bool
store_connected(const struct store *s)
{
    return s->state == ST_UP;
}

void
store_free(struct store *s)
{
    if (!s) {
        return;
    }
    s->freeing = true;
    if (s->ac) {
        redisAsyncContext *ac = s->ac;
        s->ac = NULL;
        redisAsyncFree(ac);         /* pending callbacks run with NULL */
    }
    if (s->reconnect) {
        event_free(s->reconnect);
    }
    explicit_bzero(s->password, sizeof(s->password));
    free(s);
}

/* Drop a stuck connection; pending callbacks run with NULL, then reconnect. */
static void
store_reset(struct store *s)
{
    if (s->ac) {
        log_msg(LOG_WARN, "redis: %zu replies overdue; reconnecting", s->abandoned);
        count_error("stuck");
        redisAsyncContext *ac = s->ac;
        s->ac = NULL;
        s->state = ST_DOWN;
        redisAsyncFree(ac);         /* runs on_disconnect, which reconnects */
        s->abandoned = 0;
        if (!evtimer_pending(s->reconnect, NULL)) {
            schedule_reconnect(s);
        }
    }
}

/* ---- lookups and writes ----------------------------------------------- */

static size_t
make_key(const struct store *s, const uint8_t key[CACHE_KEY_LEN], char *out, size_t outlen)
{
    char hex[2 * CACHE_KEY_LEN + 1];

    cache_key_hex(key, hex);
    return (size_t)snprintf(out, outlen, "%s%s", s->prefix, hex);
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
    count_error("timeout");
    g->fn(g->arg, NULL);
    if (++s->abandoned > MAX_ABANDONED) {
        store_reset(s);
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
    } else if (s->abandoned > 0) {
        s->abandoned--;
    }
    event_free(g->timer);
    free(g);
}

struct store_get *
store_get(struct store *s, const uint8_t key[CACHE_KEY_LEN], store_get_fn fn, void *arg)
{
    char k[256];

    if (!s || s->state != ST_UP || !s->ac || s->pending >= MAX_PENDING) {
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
    size_t kl = make_key(s, key, k, sizeof(k));
    const char *argv[2] = { "GET", k };
    size_t argvlen[2] = { 3, kl };
    if (!g->timer ||
        redisAsyncCommandArgv(s->ac, on_get_reply, g, 2, argv, argvlen) != REDIS_OK) {
        if (g->timer) {
            event_free(g->timer);
        }
        free(g);
        return NULL;
    }
    s->pending++;
    struct timeval tv = { s->timeout_ms / 1000, (s->timeout_ms % 1000) * 1000 };
    evtimer_add(g->timer, &tv);
    return g;
}

void
store_get_cancel(struct store_get *g)
{
    if (g && !g->done) {
        g->done = true;
        evtimer_del(g->timer);
    }
}

static void
on_put_reply(redisAsyncContext *ac, void *r, void *priv)
{
    struct store *s = priv;
    redisReply *reply = r;

    (void)ac;
    s->pending--;
    if (!reply || reply->type == REDIS_REPLY_ERROR) {
        count_error(reply ? "write" : "disconnect");
    } else {
        metrics_addf("dsgate_cache_stores_total", 1, "tier=\"redis\"");
    }
}

void
store_put(struct store *s, const struct cache_entry *e, int64_t ttl_ms)
{
    char k[256], ttl[24];
    size_t len;

    if (!s || s->state != ST_UP || !s->ac || s->pending >= MAX_PENDING || ttl_ms <= 0) {
        return;
    }
    char *val = cache_entry_encode(e, &len);
    if (!val) {
        return;
    }
    size_t kl = make_key(s, e->key, k, sizeof(k));
    int tl = snprintf(ttl, sizeof(ttl), "%lld", (long long)ttl_ms);
    const char *argv[5] = { "SET", k, val, "PX", ttl };
    size_t argvlen[5] = { 3, kl, len, 2, (size_t)tl };
    if (redisAsyncCommandArgv(s->ac, on_put_reply, s, 5, argv, argvlen) == REDIS_OK) {
        s->pending++;
    }
    free(val);
}
