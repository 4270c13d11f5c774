/*
 * reply: the headers dsgate adds to every answer it proxies, replays or
 * makes itself (X-Cache, X-Dsgate-*), built in one place; and the answers
 * dsgate makes itself.
 */
#ifndef DSGATE_REPLY_H
#define DSGATE_REPLY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "http.h"

#define REPLY_MAX_HEADERS 6

struct reply_info {
    int attempts;
    int64_t queue_ms;
    const char *upstream; /* NULL: no X-Dsgate-Upstream */
    const char *cache;    /* "HIT", "MISS", "BYPASS", or NULL: no X-Cache */
    bool coalesced;
    const char *client; /* NULL: no X-Dsgate-Client */
};

/* Storage for the numbers the headers point to. */
struct reply_buf {
    char attempts[16];
    char queue_ms[24];
};

/* The client name for X-Dsgate-Client, or NULL. */
#define REPLY_CLIENT(r) ((r)->client ? (r)->client->name : NULL)

/* Append the set to H (room for REPLY_MAX_HEADERS); returns how many. */
size_t reply_headers(struct http_header *h, const struct reply_info *ri, struct reply_buf *b);

/*
 * How a request's answer goes out when dsgate makes it itself (below:
 * errors, cache hits, the stored auth answer, unknown models).  Each sets
 * the request's status and end and drops its client pointer once the
 * reply is over.
 */
struct cache_entry;
struct gw_upstream;
struct request;
enum req_end;

/* The request failed: tell the client in the best way still open (JSON, SSE error, cut). */
void reply_fail(struct request *r, int status, const char *code, const char *message,
                enum req_end end);
/*
 * dsgate's own 200 head (keepalive.after passed without the upstream's):
 * text/event-stream when the request asked for a stream, else JSON;
 * chunked.  Later failures become the body (an SSE error event or an
 * error object, in the request's dialect).
 */
void reply_early_head(struct request *r);
/*
 * A non-200 came after the reply had started (an earlier attempt's head
 * and keep-alives): an SSE error event with STATUS and the upstream's
 * message from BODY (its error JSON, LEN bytes, may be NULL).
 */
void reply_late_error(struct request *r, int status, const char *body, size_t len);
/* Answer from a cache entry of TIER ("memory", "redis"); takes the reference. */
void reply_cached(struct request *r, struct cache_entry *e, const char *tier);
/* Every eligible upstream is shut by 401/402/403: the answer U stored. */
void reply_auth(struct request *r, struct gw_upstream *u);
/* 503 with Retry-After (RETRY_MS until the next probe): no upstream can be reached. */
void reply_unreachable(struct request *r, int64_t retry_ms);
/* Over a limit of its client (WHY: enum client_reason; WAIT_US until it allows): 429. */
void reply_client_limited(struct request *r, int why, int64_t wait_us);
/* 404 naming the models the configured upstreams take. */
void reply_unknown_model(struct request *r);
/* 404: no configured upstream takes the request's dialect (upstreams[].dialects). */
void reply_no_dialect(struct request *r);

#endif
