/*
 * attempt: one try of a request against one upstream.
 *
 * It builds what goes upstream (URL, the client's headers with the
 * upstream's key, the body with the model renamed for an aliased
 * upstream), runs the transfer, and turns what comes back into what the
 * owner passes on: the reply head without hop-by-hop and framing headers
 * (a non-stream answer's head held until its first data byte, leading
 * keep-alive white space dropped), the body with the model renamed back,
 * and the token counts of the answer's usage, read as the request's
 * dialect writes them.  It keeps the body of a
 * 401/402/403 for the upstream to replay while its circuit is open.
 *
 * The owner decides; the attempt reports through struct attempt_ops:
 * head (take, drop for a retry, or abort), blocked (back-pressure),
 * start (the reply head), data, and done with an attempt_result.  No
 * callback runs after attempt_cancel().
 */
#ifndef DSGATE_ATTEMPT_H
#define DSGATE_ATTEMPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "dialect.h"
#include "route.h"

#define ATTEMPT_MAX_HEADERS 128

struct evbuffer;
struct gw_upstream;
struct http_header;
struct up_xfer;
struct upstream_ctx;

/* How an attempt ended; FIRST_DATA and IDLE are the owner's deadlines. */
enum attempt_outcome {
    ATT_OK,          /* a complete answer was passed on */
    ATT_DROPPED,     /* a complete answer read and dropped: its head asked for a retry */
    ATT_CONNECT,     /* DNS, refused, TLS: nothing exchanged */
    ATT_TIMEOUT,     /* curl's connect or total timeout */
    ATT_BROKEN,      /* reset, truncated or unparsable answer */
    ATT_LATE_STATUS, /* a non-200 head after an earlier attempt started the reply */
    ATT_ABORTED,     /* the owner stopped it (nobody wants the answer) */
    ATT_EMPTY,       /* a 200 closed before any data byte (held, then closed): the owner's call */
    ATT_FIRST_DATA,  /* no data byte within timeouts.first_data */
    ATT_IDLE,        /* a stream silent beyond timeouts.idle */
    ATT_INVALID,     /* the upstream answered something invalid (a bad or too large head) */
    ATT_OUTCOMES
};

struct attempt_result {
    enum attempt_outcome outcome;
    int status; /* of the head, 0 when none came */
    const char *detail;
    bool head_pending; /* ATT_OK: the held head never went out (no data byte came) */
    const char *body;  /* ATT_LATE_STATUS: the start of its body, or NULL */
    size_t body_len;
};

/* The owner's verdict on a head. */
enum attempt_head {
    AH_TAKE,     /* pass this answer on (start() follows) */
    AH_CONTINUE, /* the reply already started: pass the body on without a head */
    AH_DROP,     /* read and drop the body; a retry follows */
    AH_LATE,     /* a late status: keep its body for the error (done(): ATT_LATE_STATUS) */
    AH_GONE,     /* nobody wants the answer: stop (done() follows with ATT_ABORTED) */
};

struct attempt_head_info {
    int status;
    int64_t retry_after_ms; /* -1: none */
    const char *ctype;      /* NULL: none */
    bool sse;
};

struct attempt_ops {
    enum attempt_head (*head)(void *owner, const struct attempt_head_info *h);
    /* Keep-alive white space came before the first data byte (once per attempt). */
    void (*held)(void *owner);
    /* True when the receiver is full: the transfer pauses until attempt_resume(). */
    bool (*blocked)(void *owner);
    /* The reply head: HDRS has room for REPLY headers more after N; CLEN -1: unknown. */
    void (*start)(void *owner, int status, struct http_header *hdrs, size_t n, int64_t clen);
    /* Answer bytes; UP_CONTINUE or UP_ABORT. */
    int (*data)(void *owner, const char *p, size_t len);
    void (*done)(void *owner, const struct attempt_result *res);
};

/*
 * The client's headers that may go upstream, copied once when the request
 * starts: attempts are built from this copy, never from the client's
 * request, because a leader whose client left goes on for its followers.
 */
struct client_headers {
    struct evbuffer *store;
    const char *line[ATTEMPT_MAX_HEADERS]; /* "Name: value" */
    size_t n;
    bool have_ct, have_accept;
};

struct http_req;
/* Copy HR's forwardable headers (without Accept-Encoding when NO_ENCODING); 0 or -1. */
int client_headers_copy(struct client_headers *ch, const struct http_req *hr, bool no_encoding);
void client_headers_free(struct client_headers *ch);

/* What the request gives each attempt (borrowed for the attempt's life). */
struct attempt_spec {
    const char *method;
    const char *target; /* path and query */
    const char *body;
    size_t body_len;
    const char *model; /* the client's model, or NULL */
    size_t model_off;  /* where its JSON string is in BODY (with quotes), for a rename */
    size_t model_len;
    const struct client_headers *ch;
    const struct dialect *dialect; /* how the answer's usage is read */
    bool count_usage; /* keep the answer's head and tail for its usage */
};

struct attempt {
    struct gw_upstream *up; /* referenced; the last upstream tried */
    struct up_xfer *xfer;   /* NULL when no transfer runs */
    const struct attempt_ops *ops;
    void *owner;
    char *url;
    const char *fwd[ATTEMPT_MAX_HEADERS + 8];
    int status;
    bool dropping; /* this answer is read and dropped */
    bool late;     /* a late status: its body is kept in errbody */
    bool paused;
    /* a non-stream head, held until the first data byte: "name\0value\0" */
    struct evbuffer *dhead;
    size_t dhead_n;
    int64_t dhead_clen;
    size_t ws_dropped;
    bool head_deferred;
    bool held_told; /* ops.held ran for this attempt */
    bool encoded;   /* the answer has a Content-Encoding (not identity): not shared */
    /* the body with the model renamed for this upstream, and the way back */
    char *send_body;
    size_t send_len;
    struct model_rewrite mrw;
    bool rewriting;
    /* a 401/402/403 answer, kept for replay while the circuit is open */
    bool auth_failed;
    struct evbuffer *errbody;
    /* the owner's bookkeeping (dispatch.c): its slot, fleet lease, limit feedback */
    bool slot_held;
    char *lease;
    bool held;      /* the upstream holds it (keep-alives, no data) */
    bool limit_fed; /* the adaptive limit heard it */
    int64_t t_start_us;
    /* token accounting from the answer's usage */
    const struct dialect *dialect;
    bool sse;  /* the answer is a stream */
    char *head; /* its first bytes (an Anthropic stream's message_start) */
    size_t head_len;
    char *tail; /* its last bytes (the final usage) */
    size_t tail_len;
    int64_t tokens[TOK_KINDS]; /* by enum token_kind; -1: unknown */
};

void attempt_init(struct attempt *a);
/*
 * Start a try against UP (referenced while it is the attempt's upstream).
 * 0, or -1 when it could not start (nothing will be called back).
 */
int attempt_start(struct attempt *a, struct upstream_ctx *ctx, struct gw_upstream *up,
                  const struct attempt_spec *spec, const struct attempt_ops *ops, void *owner);
bool attempt_running(const struct attempt *a);
/* Stop the transfer, if any; no callback runs afterwards. */
void attempt_cancel(struct attempt *a);
/* The owner sent a reply head itself: a head the attempt holds will not go. */
void attempt_head_out(struct attempt *a);
/* Send a head still held (ATT_OK with head_pending that is passed on as it is). */
void attempt_send_head(struct attempt *a);
/* The receiver drained: a paused transfer goes on (may deliver data at once). */
void attempt_resume(struct attempt *a);
/* Release everything, the upstream reference too. */
void attempt_free(struct attempt *a);

/*
 * The headers that carry a client's credential (Authorization; x-api-key as
 * the Anthropic SDKs send it; api-key as Azure-style clients do): they scope
 * the cache and coalescing, and none goes upstream next to dsgate's key.
 */
#define CREDENTIAL_HEADERS 3
extern const char *const credential_headers[CREDENTIAL_HEADERS];

/*
 * May a client header called NAME go upstream?  Not hop-by-hop, framing,
 * Host or dsgate's own; CONNECTION is the client's Connection header.
 */
bool attempt_header_forwardable(const char *name, const char *connection);

/* The outcome's name in dsgate_upstream_attempts_total (OK and DROPPED: by status). */
const char *attempt_outcome_label(enum attempt_outcome o, int status);

#endif
