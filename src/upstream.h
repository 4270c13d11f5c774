/*
 * upstream: HTTP(S) transfers to upstreams with libcurl's multi-socket API,
 * driven by the process's libevent loop (no threads of our own, no blocking
 * calls; curl's threaded resolver keeps DNS off the loop).
 *
 * A transfer reports through three callbacks, always from the event loop
 * and never after upstream_cancel():
 *   on_head  once, when the final status and headers are in;
 *   on_data  for each piece of the body, may ask to pause;
 *   on_done  once, at the end, with the outcome.
 * A head that is invalid (bytes that must not be forwarded, too large, an
 * unsolicited 1xx) never reaches on_head: the transfer ends with UP_INVALID.
 * on_head and on_data must not cancel the transfer; they return
 * UP_ABORT instead, and on_done follows with UP_ABORTED.
 */
#ifndef DSGATE_UPSTREAM_H
#define DSGATE_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct http_header;
struct upstream_ctx;
struct up_xfer;

enum up_result {
    UP_OK = 0,
    UP_CONNECT, /* DNS, refused, TLS handshake: nothing sent or received */
    UP_TIMEOUT, /* connect or total timeout */
    UP_BROKEN,  /* reset, truncated or unparsable response */
    UP_ABORTED, /* a callback asked to stop */
    UP_INVALID, /* the upstream answered, but its answer is invalid (see uphead.h) */
};

#define UP_CONTINUE 0
#define UP_ABORT    (-1)
#define UP_PAUSE    (-2)

struct up_callbacks {
    int (*on_head)(void *arg, int status, const struct http_header *hdrs, size_t n);
    /* Returns UP_CONTINUE (all LEN bytes taken), UP_PAUSE (none taken) or UP_ABORT. */
    int (*on_data)(void *arg, const char *data, size_t len);
    void (*on_done)(void *arg, enum up_result result, const char *detail);
};

struct up_request {
    const char *method;
    const char *url;            /* full URL */
    const char *const *headers; /* "Name: value" lines, NULL-terminated */
    const char *body;           /* must stay valid until on_done/cancel */
    size_t body_len;
    int64_t connect_ms;
    int64_t total_ms;    /* 0: none */
    const char *ca_file; /* NULL or "": system store */
    bool insecure;
};

struct upstream_ctx *upstream_ctx_new(struct event_base *base);
void upstream_ctx_free(struct upstream_ctx *ctx);

/* Start a transfer; NULL on failure (nothing will be called back). */
struct up_xfer *upstream_start(struct upstream_ctx *ctx, const struct up_request *rq,
                               const struct up_callbacks *cb, void *arg);
/* Stop and release a transfer; no callback runs afterwards. */
void upstream_cancel(struct up_xfer *x);
/* Pause or resume receiving (back-pressure). Resuming may call on_data at once. */
void upstream_pause(struct up_xfer *x, bool pause);
/*
 * From the next body byte on, the rest of the answer must come within MS
 * (0: no bound); past it the transfer ends with UP_TIMEOUT.  Called from
 * on_head.
 */
void upstream_bound_body(struct up_xfer *x, int64_t ms);

const char *upstream_result_name(enum up_result r);

#endif
