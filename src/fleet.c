/*
 * fleet: leases, the shared adaptive limit and fleet-wide coalescing in
 * Redis (see fleet.h).
 *
 * Two links: CMD for scripts and commands, SUB subscribed to the fleet
 * channel ("free <upstream>", "done <key>", "fail <key>").  Every reply
 * callback may run with a NULL reply when the link drops; what it points
 * at (the fleet, a fleet_up, a fleet_wait) is alive until then, because
 * fleet_free() drops the links before it frees anything else and a
 * cancelled wait is freed by its pending reply, not by the canceller.
 */
#include "fleet.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <hiredis/hiredis.h>

#include "http.h"
#include "log.h"
#include "metrics.h"
#include "rlink.h"

#define CHANNEL     "dsgate:fleet"
#define KEY_PREFIX  "dsgate:fleet:"
#define ACQUIRE_MAX 64   /* leases asked for at once */
#define RETRY_MS    50   /* ask again when none was free */
#define FLUSH_MS    1000 /* successes sent to the shared limit */

/* KEYS: lease set, limit; ARGV: max_inflight, ttl ms, count, member prefix */
static const char acquire_lua[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)\n"
    "local max = tonumber(ARGV[1])\n"
    "local limit = tonumber(redis.call('GET', KEYS[2]) or max) or max\n"
    "if limit > max then limit = max end\n"
    "if limit < 1 then limit = 1 end\n"
    "local free = math.floor(limit) - redis.call('ZCARD', KEYS[1])\n"
    "local want = tonumber(ARGV[3])\n"
    "if free < want then want = free end\n"
    "local out = {}\n"
    "if want <= 0 then return out end\n"
    "local seq = redis.call('INCRBY', KEYS[1] .. ':seq', want)\n"
    "for i = 1, want do\n"
    "  local m = ARGV[4] .. (seq - want + i)\n"
    "  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), m)\n"
    "  out[#out + 1] = m\n"
    "end\n"
    "redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)\n"
    "redis.call('PEXPIRE', KEYS[1] .. ':seq', 86400000)\n"
    "return out\n";

/* KEYS: lease set; ARGV: ttl ms, members... (only existing ones are renewed) */
static const char renew_lua[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local n = 0\n"
    "for i = 2, #ARGV do\n"
    "  n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[i])\n"
    "end\n"
    "redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)\n"
    "return n\n";

/* KEYS: lease set; ARGV: channel, message, members... */
static const char release_lua[] = "for i = 3, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end\n"
                                  "redis.call('PUBLISH', ARGV[1], ARGV[2])\n"
                                  "return 1\n";

/* KEYS: limit, last cut; ARGV: max, gap ms (cut x0.7) or successes (raise) */
static const char cut_lua[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local max = tonumber(ARGV[1])\n"
    "local last = tonumber(redis.call('GET', KEYS[2]) or '0')\n"
    "local limit = tonumber(redis.call('GET', KEYS[1]) or max) or max\n"
    "if now - last >= tonumber(ARGV[2]) then\n"
    "  limit = limit * 0.7\n"
    "  if limit < 1 then limit = 1 end\n"
    "  redis.call('SET', KEYS[1], tostring(limit), 'PX', 3600000)\n"
    "  redis.call('SET', KEYS[2], tostring(now), 'PX', 3600000)\n"
    "end\n"
    "return tostring(limit)\n";

static const char raise_lua[] =
    "local max = tonumber(ARGV[1])\n"
    "local limit = tonumber(redis.call('GET', KEYS[1]) or max) or max\n"
    "if limit >= max then redis.call('DEL', KEYS[1]) return tostring(max) end\n"
    "for i = 1, tonumber(ARGV[2]) do limit = limit + 1 / limit end\n"
    "if limit > max then limit = max end\n"
    "redis.call('SET', KEYS[1], tostring(limit), 'PX', 3600000)\n"
    "return tostring(limit)\n";

struct lease {
    char *member;
    int64_t granted_us;
};

struct fleet_up {
    struct fleet_up *next;
    struct fleet *f;
    char *name;
    struct lease *granted; /* granted, not yet used */
    size_t ngranted;
    char **held; /* in use by transfers */
    size_t nheld, cheld;
    bool acquiring;
    int64_t want_since_us;
    uint32_t successes;
    int max_inflight;
    double limit; /* last fleet-wide limit seen */
};

enum wait_state { W_CLAIMING, W_WAITING };

struct fleet_wait {
    struct fleet_wait *prev, *next;
    struct fleet *f;
    char hex[2 * CACHE_KEY_LEN + 1];
    enum wait_state state;
    bool cancelled;
    bool linked;
    fleet_claim_fn claim_fn;
    fleet_done_fn done_fn;
    void *arg;
    struct event *timer;
};

struct fleet {
    struct fleet_hooks hooks;
    struct event_base *base;
    struct rlink *cmd;
    struct rlink *sub;
    char instance[40];
    struct fleet_up *ups;
    struct fleet_wait *waits;
    struct event *renew;
    struct event *flush;
    struct event *retry;
    bool active;
    int64_t lease_ttl_ms;
    int fallback_instances;
};

struct acquire_ctx {
    struct fleet_up *fu;
    int64_t sent_us;
};

/* ---- helpers ------------------------------------------------------------ */

static void
eval(struct fleet *f, redisCallbackFn *cb, void *priv, const char *script, int nkeys,
     const char **args, size_t nargs)
{
    redisAsyncContext *ac = rlink_ctx(f->cmd);
    const char *argv[8 + 2 * ACQUIRE_MAX + 64];
    size_t argvlen[sizeof(argv) / sizeof(argv[0])];
    char nk[8];
    size_t n = 0;

    if (!ac || nargs + 3 > sizeof(argv) / sizeof(argv[0])) {
        if (cb) {
            cb(NULL, NULL, priv);
        }
        return;
    }
    snprintf(nk, sizeof(nk), "%d", nkeys);
    argv[n++] = "EVAL";
    argv[n++] = script;
    argv[n++] = nk;
    for (size_t i = 0; i < nargs; i++) {
        argv[n++] = args[i];
    }
    for (size_t i = 0; i < n; i++) {
        argvlen[i] = strlen(argv[i]);
    }
    if (redisAsyncCommandArgv(ac, cb, priv, (int)n, argv, argvlen) != REDIS_OK && cb) {
        cb(NULL, NULL, priv);
    }
}

static void
key_for(char *out, size_t len, const char *what, const char *name)
{
    snprintf(out, len, KEY_PREFIX "%s:%s", what, name);
}

static void
update_gauges(struct fleet *f)
{
    metrics_set("dsgate_fleet_fallback", NULL, f->active ? 0 : 1);
    for (struct fleet_up *fu = f->ups; fu; fu = fu->next) {
        metrics_setf("dsgate_fleet_leases_held", (double)(fu->nheld + fu->ngranted),
                     "upstream=\"%s\"", fu->name);
    }
}

/* ---- upstream state ----------------------------------------------------- */

struct fleet_up *
fleet_up_get(struct fleet *f, const char *name)
{
    for (struct fleet_up *fu = f->ups; fu; fu = fu->next) {
        if (strcmp(fu->name, name) == 0) {
            return fu;
        }
    }
    struct fleet_up *fu = calloc(1, sizeof(*fu));
    if (!fu || !(fu->name = strdup(name))) {
        free(fu);
        return NULL;
    }
    fu->f = f;
    fu->next = f->ups;
    f->ups = fu;
    return fu;
}

bool
fleet_active(const struct fleet *f)
{
    return f && f->active;
}

int
fleet_local_max(const struct fleet *f, int max_inflight)
{
    if (!f || f->active) {
        return max_inflight;
    }
    int n = max_inflight / f->fallback_instances;
    return n < 1 ? 1 : n;
}

bool
fleet_lease_ready(const struct fleet_up *fu)
{
    return fu && fu->ngranted > 0;
}

static int
held_add(struct fleet_up *fu, char *m)
{
    if (fu->nheld == fu->cheld) {
        size_t c = fu->cheld ? fu->cheld * 2 : 16;
        char **h = realloc(fu->held, c * sizeof(*h));
        if (!h) {
            return -1;
        }
        fu->held = h;
        fu->cheld = c;
    }
    fu->held[fu->nheld++] = m;
    return 0;
}

char *
fleet_take(struct fleet_up *fu)
{
    int64_t now = http_now_us();
    int64_t max_age = fu->f->lease_ttl_ms * 1000 / 2;

    while (fu->ngranted > 0) {
        struct lease l = fu->granted[--fu->ngranted];
        if (now - l.granted_us > max_age || held_add(fu, l.member) < 0) {
            free(l.member); /* too old to trust: Redis may have dropped it */
            continue;
        }
        return l.member;
    }
    return NULL;
}

static void
release_members(struct fleet *f, struct fleet_up *fu, char **members, size_t n)
{
    const char *args[3 + ACQUIRE_MAX + 2];
    char key[256], msg[200];
    size_t na = 0;

    if (!f->active || n == 0) {
        return;
    }
    key_for(key, sizeof(key), "lease", fu->name);
    snprintf(msg, sizeof(msg), "free %s", fu->name);
    args[na++] = key;
    args[na++] = CHANNEL;
    args[na++] = msg;
    for (size_t i = 0; i < n && na < sizeof(args) / sizeof(args[0]); i++) {
        args[na++] = members[i];
    }
    eval(f, NULL, NULL, release_lua, 1, args, na);
}

void
fleet_release(struct fleet *f, struct fleet_up *fu, char *lease)
{
    if (!lease) {
        return;
    }
    for (size_t i = 0; i < fu->nheld; i++) {
        if (fu->held[i] == lease) {
            fu->held[i] = fu->held[--fu->nheld];
            break;
        }
    }
    release_members(f, fu, &lease, 1);
    free(lease);
    update_gauges(f);
}

/* Granted leases nobody waits for any more go back at once. */
static void
release_granted(struct fleet *f, struct fleet_up *fu)
{
    char *m[ACQUIRE_MAX];
    size_t n = 0;

    while (fu->ngranted > 0 && n < ACQUIRE_MAX) {
        m[n++] = fu->granted[--fu->ngranted].member;
    }
    release_members(f, fu, m, n);
    for (size_t i = 0; i < n; i++) {
        free(m[i]);
    }
}

static void
on_acquire(redisAsyncContext *ac, void *r, void *priv)
{
    struct acquire_ctx *ctx = priv;
    struct fleet_up *fu = ctx->fu;
    struct fleet *f = fu->f;
    redisReply *reply = r;
    size_t got = 0;

    (void)ac;
    fu->acquiring = false;
    if (reply && reply->type == REDIS_REPLY_ARRAY) {
        struct lease *g = realloc(fu->granted, (fu->ngranted + reply->elements + 1) * sizeof(*g));
        if (g) {
            fu->granted = g;
            for (size_t i = 0; i < reply->elements; i++) {
                redisReply *e = reply->element[i];
                if (e->type != REDIS_REPLY_STRING) {
                    continue;
                }
                char *m = strndup(e->str, e->len);
                if (m) {
                    g[fu->ngranted++] = (struct lease){m, http_now_us()};
                    got++;
                }
            }
        }
        metrics_observe("dsgate_fleet_lease_wait_seconds", NULL,
                        (double)(http_now_us() - ctx->sent_us) / 1e6);
    } else if (reply && reply->type == REDIS_REPLY_ERROR) {
        log_msg(LOG_WARN, "fleet: lease script failed: %s", reply->str);
        rlink_count_error(f->cmd, "script");
    }
    free(ctx);
    update_gauges(f);
    if (got > 0) {
        f->hooks.capacity(f->hooks.arg);
    } else if (!evtimer_pending(f->retry, NULL)) {
        struct timeval tv = {0, RETRY_MS * 1000};
        evtimer_add(f->retry, &tv);
    }
}

void
fleet_want(struct fleet *f, struct fleet_up *fu, int max_inflight, size_t want)
{
    char key[256], lkey[256], smax[16], sttl[24], swant[16], prefix[64];

    if (!f->active || fu->acquiring || want == 0) {
        return;
    }
    struct acquire_ctx *ctx = malloc(sizeof(*ctx));
    if (!ctx) {
        return;
    }
    ctx->fu = fu;
    ctx->sent_us = http_now_us();
    fu->acquiring = true;
    fu->max_inflight = max_inflight;
    key_for(key, sizeof(key), "lease", fu->name);
    key_for(lkey, sizeof(lkey), "limit", fu->name);
    snprintf(smax, sizeof(smax), "%d", max_inflight);
    snprintf(sttl, sizeof(sttl), "%lld", (long long)f->lease_ttl_ms);
    snprintf(swant, sizeof(swant), "%zu", want < ACQUIRE_MAX ? want : ACQUIRE_MAX);
    snprintf(prefix, sizeof(prefix), "%s:", f->instance);
    const char *args[] = {key, lkey, smax, sttl, swant, prefix};
    eval(f, on_acquire, ctx, acquire_lua, 2, args, 6);
}

static void
on_limit(redisAsyncContext *ac, void *r, void *priv)
{
    struct fleet_up *fu = priv;
    redisReply *reply = r;

    (void)ac;
    if (reply && reply->type == REDIS_REPLY_STRING) {
        fu->limit = atof(reply->str);
        metrics_setf("dsgate_fleet_limit", fu->limit, "upstream=\"%s\"", fu->name);
    }
}

void
fleet_feedback(struct fleet *f, struct fleet_up *fu, int max_inflight, bool overload)
{
    char key[256], tkey[256], smax[16];

    fu->max_inflight = max_inflight;
    if (!overload) {
        fu->successes++;
        return;
    }
    if (!f->active) {
        return;
    }
    key_for(key, sizeof(key), "limit", fu->name);
    key_for(tkey, sizeof(tkey), "limitcut", fu->name);
    snprintf(smax, sizeof(smax), "%d", max_inflight);
    const char *args[] = {key, tkey, smax, "200"};
    eval(f, on_limit, fu, cut_lua, 2, args, 4);
}

/* ---- timers --------------------------------------------------------------- */

static void
flush_cb(evutil_socket_t fd, short what, void *arg)
{
    struct fleet *f = arg;
    char key[256], smax[16], sn[16];

    (void)fd;
    (void)what;
    for (struct fleet_up *fu = f->ups; fu; fu = fu->next) {
        if (fu->successes == 0 || !f->active || fu->max_inflight <= 0) {
            fu->successes = 0;
            continue;
        }
        key_for(key, sizeof(key), "limit", fu->name);
        snprintf(smax, sizeof(smax), "%d", fu->max_inflight);
        snprintf(sn, sizeof(sn), "%u", fu->successes < 100000 ? fu->successes : 100000);
        fu->successes = 0;
        const char *args[] = {key, smax, sn};
        eval(f, on_limit, fu, raise_lua, 1, args, 3);
    }
}

static void
renew_cb(evutil_socket_t fd, short what, void *arg)
{
    struct fleet *f = arg;
    char key[256], sttl[24];

    (void)fd;
    (void)what;
    if (!f->active) {
        return;
    }
    snprintf(sttl, sizeof(sttl), "%lld", (long long)f->lease_ttl_ms);
    for (struct fleet_up *fu = f->ups; fu; fu = fu->next) {
        key_for(key, sizeof(key), "lease", fu->name);
        for (size_t off = 0; off < fu->nheld; off += ACQUIRE_MAX) {
            const char *args[2 + ACQUIRE_MAX];
            size_t na = 0;
            args[na++] = key;
            args[na++] = sttl;
            for (size_t i = off; i < fu->nheld && i < off + ACQUIRE_MAX; i++) {
                args[na++] = fu->held[i];
            }
            eval(f, NULL, NULL, renew_lua, 1, args, na);
        }
    }
    /* the renewal period follows a reloaded lease_ttl */
    int64_t ms = f->lease_ttl_ms / 3;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(f->renew, &tv);
}

static void
retry_cb(evutil_socket_t fd, short what, void *arg)
{
    struct fleet *f = arg;

    (void)fd;
    (void)what;
    f->hooks.capacity(f->hooks.arg);
}

/* ---- coalescing -------------------------------------------------------- */

static void
wait_unlink(struct fleet_wait *w)
{
    if (!w->linked) {
        return;
    }
    if (w->prev) {
        w->prev->next = w->next;
    } else {
        w->f->waits = w->next;
    }
    if (w->next) {
        w->next->prev = w->prev;
    }
    w->prev = w->next = NULL;
    w->linked = false;
}

static void
wait_free(struct fleet_wait *w)
{
    wait_unlink(w);
    if (w->timer) {
        event_free(w->timer);
    }
    free(w);
}

static void
wait_end(struct fleet_wait *w, bool done)
{
    fleet_done_fn fn = w->done_fn;
    void *arg = w->arg;

    wait_free(w);
    if (done) {
        metrics_add("dsgate_fleet_coalesced_total", NULL, 1);
    }
    fn(arg, done);
}

static void
wait_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    wait_end(arg, false);
}

static void
on_claim(redisAsyncContext *ac, void *r, void *priv)
{
    struct fleet_wait *w = priv;
    redisReply *reply = r;

    (void)ac;
    if (w->cancelled) {
        wait_free(w);
        return;
    }
    /* OK: this instance leads.  Nil: someone else does.  No reply: lead. */
    bool lead = !reply || reply->type != REDIS_REPLY_NIL;
    fleet_claim_fn fn = w->claim_fn;
    void *arg = w->arg;
    w->claim_fn = NULL;
    if (lead) {
        wait_free(w);
        fn(arg, true);
        return;
    }
    w->state = W_WAITING;
    fn(arg, false); /* calls fleet_wait() or fleet_wait_cancel() */
}

struct fleet_wait *
fleet_claim(struct fleet *f, const uint8_t key[CACHE_KEY_LEN], int64_t ttl_ms, fleet_claim_fn fn,
            void *arg)
{
    redisAsyncContext *ac = f ? rlink_ctx(f->cmd) : NULL;
    char k[256], ttl[24];

    if (!ac || !f->active) {
        return NULL;
    }
    struct fleet_wait *w = calloc(1, sizeof(*w));
    if (!w) {
        return NULL;
    }
    w->f = f;
    w->claim_fn = fn;
    w->arg = arg;
    w->state = W_CLAIMING;
    cache_key_hex(key, w->hex);
    snprintf(k, sizeof(k), KEY_PREFIX "inflight:%s", w->hex);
    snprintf(ttl, sizeof(ttl), "%lld", (long long)ttl_ms);
    const char *argv[] = {"SET", k, f->instance, "NX", "PX", ttl};
    size_t argvlen[6];
    for (int i = 0; i < 6; i++) {
        argvlen[i] = strlen(argv[i]);
    }
    if (redisAsyncCommandArgv(ac, on_claim, w, 6, argv, argvlen) != REDIS_OK) {
        free(w);
        return NULL;
    }
    return w;
}

void
fleet_wait(struct fleet_wait *w, int64_t timeout_ms, fleet_done_fn fn)
{
    w->done_fn = fn;
    w->timer = evtimer_new(w->f->base, wait_timeout_cb, w);
    w->next = w->f->waits;
    if (w->f->waits) {
        w->f->waits->prev = w;
    }
    w->f->waits = w;
    w->linked = true;
    if (w->timer) {
        struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
        evtimer_add(w->timer, &tv);
    }
}

void
fleet_wait_cancel(struct fleet_wait *w)
{
    if (!w) {
        return;
    }
    if (w->state == W_CLAIMING && w->claim_fn) {
        w->cancelled = true; /* the pending reply frees it */
        return;
    }
    wait_free(w);
}

void
fleet_finish(struct fleet *f, const uint8_t key[CACHE_KEY_LEN], bool ok)
{
    redisAsyncContext *ac = f ? rlink_ctx(f->cmd) : NULL;
    char hex[2 * CACHE_KEY_LEN + 1], k[256], msg[300];

    if (!ac) {
        return;
    }
    cache_key_hex(key, hex);
    snprintf(k, sizeof(k), KEY_PREFIX "inflight:%s", hex);
    snprintf(msg, sizeof(msg), "%s %s", ok ? "done" : "fail", hex);
    redisAsyncCommand(ac, NULL, NULL, "DEL %s", k);
    redisAsyncCommand(ac, NULL, NULL, "PUBLISH %s %s", CHANNEL, msg);
}

static void
on_message(void *arg, const char *channel, const char *msg, size_t len)
{
    struct fleet *f = arg;

    (void)channel;
    if (len > 5 && strncmp(msg, "free ", 5) == 0) {
        if (f->hooks.waiting(f->hooks.arg) > 0) {
            f->hooks.capacity(f->hooks.arg);
        }
        return;
    }
    bool done = len > 5 && strncmp(msg, "done ", 5) == 0;
    if (!done && !(len > 5 && strncmp(msg, "fail ", 5) == 0)) {
        return;
    }
    const char *hex = msg + 5;
    for (struct fleet_wait *w = f->waits, *next; w; w = next) {
        next = w->next;
        if (w->state == W_WAITING && strncmp(w->hex, hex, 2 * CACHE_KEY_LEN) == 0) {
            wait_end(w, done);
            next = f->waits; /* the list may have changed under us */
        }
    }
}

/* ---- life ------------------------------------------------------------------ */

static void
on_cmd_state(void *arg, bool up)
{
    struct fleet *f = arg;

    if (up == f->active) {
        return;
    }
    f->active = up;
    if (up) {
        log_msg(LOG_INFO, "fleet: Redis reachable; fleet-wide limits and leases in force");
    } else {
        log_msg(LOG_WARN, "fleet: Redis unreachable; each instance now allows max_inflight / %d",
                f->fallback_instances);
        for (struct fleet_up *fu = f->ups; fu; fu = fu->next) {
            while (fu->ngranted > 0) {
                free(fu->granted[--fu->ngranted].member);
            }
            fu->acquiring = false;
        }
    }
    update_gauges(f);
    f->hooks.mode(f->hooks.arg);
}

void
fleet_configure(struct fleet *f, int64_t lease_ttl_ms, int fallback_instances)
{
    f->lease_ttl_ms = lease_ttl_ms;
    f->fallback_instances = fallback_instances > 0 ? fallback_instances : 1;
}

struct fleet *
fleet_new(struct event_base *base, const struct fleet_hooks *hooks, const char *url,
          int64_t lease_ttl_ms, int fallback_instances)
{
    struct fleet *f = calloc(1, sizeof(*f));
    struct timespec ts;

    if (!f) {
        return NULL;
    }
    f->hooks = *hooks;
    f->base = base;
    fleet_configure(f, lease_ttl_ms, fallback_instances);
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(f->instance, sizeof(f->instance), "%lx-%x", (long)ts.tv_sec ^ (long)ts.tv_nsec,
             (unsigned)getpid());
    f->renew = evtimer_new(f->base, renew_cb, f);
    f->flush = event_new(f->base, -1, EV_PERSIST, flush_cb, f);
    f->retry = evtimer_new(f->base, retry_cb, f);
    f->cmd = rlink_new(f->base, url, "fleet", on_cmd_state, f);
    f->sub = rlink_new(f->base, url, "fleet-sub", NULL, NULL);
    if (!f->renew || !f->flush || !f->retry || !f->cmd || !f->sub) {
        fleet_free(f);
        return NULL;
    }
    rlink_subscribe(f->sub, CHANNEL, on_message, f);
    struct timeval fl = {FLUSH_MS / 1000, (FLUSH_MS % 1000) * 1000};
    evtimer_add(f->flush, &fl);
    renew_cb(-1, 0, f);
    update_gauges(f);
    return f;
}

void
fleet_free(struct fleet *f)
{
    if (!f) {
        return;
    }
    f->active = false;
    rlink_free(f->cmd); /* pending replies run now, with NULL */
    rlink_free(f->sub);
    while (f->waits) {
        wait_free(f->waits);
    }
    while (f->ups) {
        struct fleet_up *fu = f->ups;
        f->ups = fu->next;
        while (fu->ngranted > 0) {
            free(fu->granted[--fu->ngranted].member);
        }
        for (size_t i = 0; i < fu->nheld; i++) {
            free(fu->held[i]);
        }
        free(fu->granted);
        free(fu->held);
        free(fu->name);
        free(fu);
    }
    if (f->renew) {
        event_free(f->renew);
    }
    if (f->flush) {
        event_free(f->flush);
    }
    if (f->retry) {
        event_free(f->retry);
    }
    free(f);
}

void
fleet_trim(struct fleet *f)
{
    if (!f || f->hooks.waiting(f->hooks.arg) > 0) {
        return;
    }
    for (struct fleet_up *fu = f->ups; fu; fu = fu->next) {
        if (fu->ngranted > 0) {
            release_granted(f, fu);
        }
    }
}
