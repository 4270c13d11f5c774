/*
 * rlink: one self-healing asynchronous Redis connection on the libevent
 * loop (hiredis).  Used by the cache's Redis tier and by fleet mode.
 *
 * States: DOWN (a reconnect timer runs, backoff 100 ms doubling to 5 s),
 * CONNECTING, UP.  Commands are only sent while UP; callers treat anything
 * else as "Redis is not there".  AUTH and SELECT from the URL are sent
 * first.  hiredis calls every pending command callback exactly once, with
 * a NULL reply when the connection drops.
 */
#ifndef DSGATE_RLINK_H
#define DSGATE_RLINK_H

#include <stdbool.h>
#include <stddef.h>

#include <hiredis/async.h>

struct event_base;
struct rlink;

/* Called when the link comes up (UP true) or goes down. */
typedef void (*rlink_state_fn)(void *arg, bool up);
/* Called for every message on a subscribed channel (SUBSCRIBE links only). */
typedef void (*rlink_message_fn)(void *arg, const char *channel, const char *msg, size_t len);

/*
 * URL: redis://[[user]:password@]host[:port][/db] or unix:///path.  NAME
 * labels logs and metrics ("cache", "fleet").  NULL when the URL cannot be
 * used (logged).
 */
struct rlink *rlink_new(struct event_base *base, const char *url, const char *name,
                        rlink_state_fn on_state, void *arg);
void rlink_free(struct rlink *l);
bool rlink_up(const struct rlink *l);
/* The connection, or NULL when not UP. */
redisAsyncContext *rlink_ctx(struct rlink *l);
/* Drop the connection now and reconnect later (a stuck server). */
void rlink_reset(struct rlink *l);
/* Make this a pub/sub link: SUBSCRIBE CHANNEL after every (re)connect. */
void rlink_subscribe(struct rlink *l, const char *channel, rlink_message_fn fn, void *arg);
/* Count an error in dsgate_redis_errors_total{link,error}. */
void rlink_count_error(const struct rlink *l, const char *what);

#endif
