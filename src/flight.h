/*
 * flight: identical cacheable requests in flight at the same time share
 * one upstream call (coalescing), within this instance and, in fleet
 * mode, across instances.  Drawn in flight.c.
 *
 * The flight never ends or frees a request: it tells the owner through
 * struct flight_ops when a follower's replay is over, when a follower
 * must go its own way, and how a fleet-wide wait turned out.
 */
#ifndef DSGATE_FLIGHT_H
#define DSGATE_FLIGHT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cache_entry;
struct flight_table;
struct gateway;
struct request;

struct flight_ops {
    /* A follower's replay is over: OK, the whole answer went out; else the leader failed. */
    void (*follower_end)(struct request *r, bool ok);
    /* A follower that had not started is let go (the leader failed): dispatch it again. */
    void (*follower_free)(struct request *r);
    /* Fleet: nobody else is on it (or the wait is over without an answer): go upstream. */
    void (*go)(struct request *r);
    /* Fleet: the answer is in the shared cache; takes the reference to E. */
    void (*hit)(struct request *r, struct cache_entry *e);
};

struct flight_table *flight_table_new(const struct flight_ops *ops);
void flight_table_free(struct flight_table *t);

enum flight_role {
    FLIGHT_NONE,   /* not shared; go on alone */
    FLIGHT_FOLLOW, /* follows an identical request (replay has begun if it can) */
    FLIGHT_LEAD,   /* leads a new flight: go upstream */
    FLIGHT_FLEET,  /* leads here, and asks the fleet first: ops.go or ops.hit follow */
};

/* Follow an identical request in flight, or lead a new flight. */
enum flight_role flight_enter(struct request *r);
/* The leader's reply head (STATUS 200 shares it; another status dissolves the flight). */
void flight_head(struct request *r, int status, const char *ctype);
/* The leader's answer bytes; false when the flight cannot be shared any more. */
bool flight_append(struct request *r, const char *data, size_t len);
/* Does a leader still have followers? */
bool flight_has_followers(const struct request *r);
/*
 * The request leaves its flight at its end: a leader stores a good answer
 * (OK) and finishes or lets go its followers; a follower is unlinked.
 */
void flight_leave(struct request *r, bool ok);
/*
 * A follower's client left: it is unlinked.  Returns the flight's leader
 * when that leader has no client and nobody else waits on it, else NULL.
 */
struct request *flight_follower_gone(struct request *r);
/* A follower's client drained: replay more. */
void flight_feed(struct request *r);

#endif
