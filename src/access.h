/*
 * access: how a request ended, as data, and what is told about it: one
 * JSON access-log line and the request metrics.
 *
 * The end of a request has two coordinates, like HAProxy's termination
 * state: who ended it (the client, the upstream, dsgate itself, or nobody:
 * it completed) and where in its life (lookup, queue, backoff, attempt,
 * stream, replay).  enum req_end names each combination that happens; one
 * table gives its log label and its coordinates.  Nothing decides
 * behaviour from a label.
 */
#ifndef DSGATE_ACCESS_H
#define DSGATE_ACCESS_H

#include <stddef.h>
#include <stdint.h>

#include "sched.h"

enum req_end {
    END_NONE = 0,            /* not ended yet */
    END_COMPLETED,           /* answered from upstream, whole */
    END_CACHE_HIT,           /* answered from the cache */
    END_COALESCED,           /* replayed an identical request's answer */
    END_COALESCED_FAILED,    /* the identical request it followed failed */
    END_CIRCUIT_OPEN,        /* every upstream shut by 401/402/403: their answer */
    END_UNKNOWN_MODEL,       /* no upstream takes the model */
    END_NO_DIALECT,          /* no upstream takes the request's dialect (upstreams[].dialects) */
    END_QUEUE_FULL,          /* refused at admission */
    END_QUEUE_DISPLACED,     /* shed from the queue by a higher class */
    END_QUEUE_TIMEOUT,       /* waited longer than queue.max_wait */
    END_CLIENT_LIMITED,      /* over its client's limit (over_limit: reject, or the daily budget) */
    END_CLIENT_QUEUED,       /* the client left while queued */
    END_CLIENT_BACKOFF,      /* ... during a backoff */
    END_CLIENT_WAITING,      /* ... before any data (lookup, fleet, attempt) */
    END_CLIENT_STREAMING,    /* ... after data had started */
    END_CLIENT_CLOSED,       /* ... and the transfer was aborted */
    END_UP_UNREACHABLE,      /* connect failures, retries used up */
    END_UP_TIMEOUT,          /* no data within first_data (or curl's total) */
    END_UP_IDLE,             /* a stream went silent beyond timeouts.idle */
    END_UP_RESET,            /* the upstream connection broke */
    END_UP_ERROR,            /* a non-200 after the stream had started */
    END_SHUTDOWN,            /* dsgate stopped before it was done */
    END_INTERNAL,            /* out of memory, transfer could not start */
    END_REFUSED,             /* refused before proxying; the code says why */
    END_COUNT
};

enum end_who { WHO_NONE, WHO_CLIENT, WHO_UPSTREAM, WHO_GATEWAY };
enum end_where { AT_ADMIT, AT_LOOKUP, AT_QUEUE, AT_BACKOFF, AT_ATTEMPT, AT_STREAM, AT_REPLAY };

struct end_info {
    const char *label; /* the access log's "end" */
    enum end_who who;
    enum end_where where;
};

extern const struct end_info req_end_info[END_COUNT];

enum cache_status { CS_NONE, CS_MISS, CS_HIT, CS_BYPASS, CS_COUNT };
const char *cache_status_name(enum cache_status c);

/* Everything the access log and the request metrics say of one request. */
struct access_rec {
    uint64_t id;
    const char *method;
    const char *path;
    int status; /* 0: none was sent (counted as 499) */
    enum prio prio;
    enum cache_status cache;
    const char *upstream; /* "" when none was tried */
    int attempts;
    int64_t queue_ms;
    int64_t upstream_ms;
    int64_t first_data_ms; /* -1: no data */
    int64_t t_start_us;
    size_t bytes_in;
    uint64_t bytes_out;
    const int64_t *tokens; /* by enum token_kind (dialect.h); -1 unknown; NULL: none */
    const char *client; /* its client's name, or NULL */
    int reasoning_restored; /* assistant messages that got their reasoning back (compat.c) */
    enum req_end end;
    const char *code; /* END_REFUSED: the error code, as the end label */
};

/* Log and count a request that ended. */
void access_note(const struct access_rec *a);

#endif
