/*
 * rlink: a self-healing asynchronous Redis connection (see rlink.h).
 *
 * The hiredis context belongs to hiredis once a connect or disconnect
 * callback reports failure: it frees it after the callback, so the link
 * forgets the pointer there and arms the reconnect timer.
 */
#include "rlink.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/hiredis.h>

#include "log.h"
#include "metrics.h"

#define RECONNECT_MIN_MS 100
#define RECONNECT_MAX_MS 5000

enum link_state { L_DOWN, L_CONNECTING, L_UP };

struct rlink {
    struct event_base *base;
    redisAsyncContext *ac;
    enum link_state state;
    struct event *reconnect;
    int64_t backoff_ms;
    char name[16];
    char host[256];
    int port;
    char unix_path[256];
    char user[128];
    char password[256]; /* secret: never logged */
    int db;
    bool freeing;
    rlink_state_fn on_state;
    void *state_arg;
    char *channel; /* pub/sub link: the channel */
    rlink_message_fn on_message;
    void *msg_arg;
};

static void link_connect(struct rlink *l);

void
rlink_count_error(const struct rlink *l, const char *what)
{
    metrics_addf("dsgate_redis_errors_total", 1, "link=\"%s\",error=\"%s\"", l->name, what);
}

static void
reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    link_connect(arg);
}

static void
set_down(struct rlink *l)
{
    bool was_up = l->state == L_UP;

    l->state = L_DOWN;
    if (l->freeing) {
        return;
    }
    if (!evtimer_pending(l->reconnect, NULL)) {
        struct timeval tv = {l->backoff_ms / 1000, (l->backoff_ms % 1000) * 1000};
        evtimer_add(l->reconnect, &tv);
        l->backoff_ms = l->backoff_ms * 2 > RECONNECT_MAX_MS ? RECONNECT_MAX_MS : l->backoff_ms * 2;
    }
    if (was_up && l->on_state) {
        l->on_state(l->state_arg, false);
    }
}

static void
on_message_reply(redisAsyncContext *ac, void *r, void *priv)
{
    struct rlink *l = priv;
    redisReply *reply = r;

    (void)ac;
    if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements < 3) {
        return;
    }
    redisReply *kind = reply->element[0], *ch = reply->element[1], *msg = reply->element[2];
    if (kind->type == REDIS_REPLY_STRING && strcmp(kind->str, "message") == 0 &&
        ch->type == REDIS_REPLY_STRING && msg->type == REDIS_REPLY_STRING && l->on_message) {
        l->on_message(l->msg_arg, ch->str, msg->str, msg->len);
    }
}

static void
on_connect(const redisAsyncContext *ac, int status)
{
    struct rlink *l = ac->data;

    if (status != REDIS_OK) {
        log_msg(LOG_WARN, "redis (%s): connect failed: %s", l->name, ac->errstr);
        l->ac = NULL; /* hiredis frees the context */
        rlink_count_error(l, "connect");
        set_down(l);
        return;
    }
    log_msg(LOG_INFO, "redis (%s): connected", l->name);
    l->state = L_UP;
    l->backoff_ms = RECONNECT_MIN_MS;
    if (l->on_state) {
        l->on_state(l->state_arg, true);
    }
}

static void
on_disconnect(const redisAsyncContext *ac, int status)
{
    struct rlink *l = ac->data;

    if (status != REDIS_OK && !l->freeing) {
        log_msg(LOG_WARN, "redis (%s): connection lost: %s", l->name, ac->errstr);
        rlink_count_error(l, "disconnect");
    }
    l->ac = NULL;
    set_down(l);
}

static void
on_setup_reply(redisAsyncContext *ac, void *r, void *priv)
{
    redisReply *reply = r;
    struct rlink *l = priv;

    if (reply && reply->type == REDIS_REPLY_ERROR) {
        log_msg(LOG_WARN, "redis (%s): AUTH/SELECT refused", l->name);
        rlink_count_error(l, "auth");
        redisAsyncDisconnect(ac);
    }
}

static void
link_connect(struct rlink *l)
{
    redisAsyncContext *ac;

    l->state = L_CONNECTING;
    ac =
        l->unix_path[0] ? redisAsyncConnectUnix(l->unix_path) : redisAsyncConnect(l->host, l->port);
    if (!ac || ac->err) {
        log_msg(LOG_WARN, "redis (%s): cannot connect: %s", l->name,
                ac ? ac->errstr : "out of memory");
        if (ac) {
            redisAsyncFree(ac);
        }
        rlink_count_error(l, "connect");
        set_down(l);
        return;
    }
    ac->data = l;
    l->ac = ac;
    redisLibeventAttach(ac, l->base);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    /* commands queue until the connection is up */
    if (l->password[0]) {
        if (l->user[0]) {
            redisAsyncCommand(ac, on_setup_reply, l, "AUTH %s %s", l->user, l->password);
        } else {
            redisAsyncCommand(ac, on_setup_reply, l, "AUTH %s", l->password);
        }
    }
    if (l->db > 0) {
        redisAsyncCommand(ac, on_setup_reply, l, "SELECT %d", l->db);
    }
    if (l->channel) {
        redisAsyncCommand(ac, on_message_reply, l, "SUBSCRIBE %s", l->channel);
    }
}

/* redis://[[user]:password@]host[:port][/db] or unix:///path */
static int
parse_url(struct rlink *l, const char *url)
{
    const char *p;

    if (strncmp(url, "unix://", 7) == 0) {
        snprintf(l->unix_path, sizeof(l->unix_path), "%s", url + 7);
        return l->unix_path[0] ? 0 : -1;
    }
    if (strncmp(url, "rediss://", 9) == 0) {
        log_msg(LOG_ERROR,
                "redis (%s): rediss:// (TLS) needs a hiredis built with TLS; this "
                "build has none",
                l->name);
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
            snprintf(l->user, sizeof(l->user), "%.*s", (int)(colon - p), p);
            snprintf(l->password, sizeof(l->password), "%.*s", (int)(at - colon - 1), colon + 1);
        } else {
            snprintf(l->password, sizeof(l->password), "%.*s", (int)(at - p), p);
        }
        p = at + 1;
    }
    const char *slash = strchr(p, '/');
    size_t hl = slash ? (size_t)(slash - p) : strlen(p);
    char hostport[256];
    snprintf(hostport, sizeof(hostport), "%.*s", (int)hl, p);
    l->port = 6379;
    char *colon = strrchr(hostport, ':');
    if (colon && !strchr(colon, ']')) {
        l->port = atoi(colon + 1);
        *colon = '\0';
    }
    char *h = hostport;
    if (h[0] == '[') {
        h++;
        h[strcspn(h, "]")] = '\0';
    }
    snprintf(l->host, sizeof(l->host), "%s", h[0] ? h : "127.0.0.1");
    l->db = slash && slash[1] ? atoi(slash + 1) : 0;
    return l->port > 0 && l->port < 65536 ? 0 : -1;
}

struct rlink *
rlink_new(struct event_base *base, const char *url, const char *name, rlink_state_fn on_state,
          void *arg)
{
    struct rlink *l = calloc(1, sizeof(*l));

    if (!l) {
        return NULL;
    }
    l->base = base;
    l->backoff_ms = RECONNECT_MIN_MS;
    l->on_state = on_state;
    l->state_arg = arg;
    snprintf(l->name, sizeof(l->name), "%s", name);
    l->reconnect = evtimer_new(base, reconnect_cb, l);
    if (!l->reconnect || parse_url(l, url) < 0) {
        log_msg(LOG_ERROR, "redis (%s): cannot use the URL", name);
        rlink_free(l);
        return NULL;
    }
    link_connect(l);
    return l;
}

void
rlink_subscribe(struct rlink *l, const char *channel, rlink_message_fn fn, void *arg)
{
    free(l->channel);
    l->channel = strdup(channel);
    l->on_message = fn;
    l->msg_arg = arg;
    if (l->ac && l->channel) {
        redisAsyncCommand(l->ac, on_message_reply, l, "SUBSCRIBE %s", l->channel);
    }
}

bool
rlink_up(const struct rlink *l)
{
    return l && l->state == L_UP && l->ac;
}

redisAsyncContext *
rlink_ctx(struct rlink *l)
{
    return rlink_up(l) ? l->ac : NULL;
}

void
rlink_reset(struct rlink *l)
{
    if (l->ac) {
        log_msg(LOG_WARN, "redis (%s): replies overdue; reconnecting", l->name);
        rlink_count_error(l, "stuck");
        redisAsyncContext *ac = l->ac;
        l->ac = NULL;
        redisAsyncFree(ac); /* pending callbacks run with NULL, then on_disconnect */
        set_down(l);
    }
}

void
rlink_free(struct rlink *l)
{
    if (!l) {
        return;
    }
    l->freeing = true;
    if (l->ac) {
        redisAsyncContext *ac = l->ac;
        l->ac = NULL;
        redisAsyncFree(ac);
    }
    if (l->reconnect) {
        event_free(l->reconnect);
    }
    explicit_bzero(l->password, sizeof(l->password));
    free(l->channel);
    free(l);
}
