/*
 * attempt: one try of a request against one upstream (see attempt.h).
 *
 *   attempt_start ──> on_head ──ops.head──> TAKE: filter headers; a stream's
 *        │               │                  head goes at once (ops.start),
 *        │               │                  another's waits for its first
 *        │               │                  data byte
 *        │               ├── DROP: read and drop the body (retry follows)
 *        │               └── ABORT: stop (late status)
 *        v
 *     on_data ──> blocked? pause ──> rename the model back ──> drop leading
 *        │        white space while the head waits ──> ops.start, ops.data
 *        v
 *     on_done ──> flush the renamer, an empty body's head, usage ──> ops.done
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <event2/buffer.h>

#include "attempt.h"
#include "gateway.h"
#include "http.h"
#include "metrics.h"
#include "reply.h"
#include "retry.h"
#include "uphead.h"
#include "upstream.h"

#define USAGE_HEAD   4096 /* the start of an answer, where a stream's message_start is */
#define USAGE_TAIL   8192 /* the end of an answer, where "usage" is */
#define ERRBODY_MAX  8192 /* an error answer kept for replay or its message */

/* ---- headers -------------------------------------------------------------- */

static bool
is_hop_by_hop(const char *name)
{
    static const char *const hop[] = {
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
        "TE",         "Trailer",    "Trailers",           "Transfer-Encoding",   "Upgrade",
    };
    for (size_t i = 0; i < sizeof(hop) / sizeof(hop[0]); i++) {
        if (strcasecmp(name, hop[i]) == 0) {
            return true;
        }
    }
    return strncasecmp(name, "Proxy-", 6) == 0;
}

/* Is NAME listed in the Connection header value CONN? */
static bool
named_by_connection(const char *conn, const char *name)
{
    size_t nl = strlen(name);

    if (!conn) {
        return false;
    }
    for (const char *p = conn; *p;) {
        p += strspn(p, ", \t");
        size_t tl = strcspn(p, ", \t");
        if (tl == nl && strncasecmp(p, name, nl) == 0) {
            return true;
        }
        p += tl;
    }
    return false;
}

/* Is NAME listed by any of the answer's Connection headers (there may be several)? */
static bool
named_by_any_connection(const struct http_header *h, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(h[i].name, "Connection") == 0 && named_by_connection(h[i].value, name)) {
            return true;
        }
    }
    return false;
}

bool
attempt_header_forwardable(const char *name, const char *connection)
{
    return !(is_hop_by_hop(name) || named_by_connection(connection, name) ||
             strcasecmp(name, "Host") == 0 || strcasecmp(name, "Content-Length") == 0 ||
             strcasecmp(name, "Expect") == 0 || strcasecmp(name, "X-Priority") == 0 ||
             strcasecmp(name, "X-Dsgate-Client") == 0);
}

int
client_headers_copy(struct client_headers *ch, const struct http_req *hr, bool no_encoding)
{
    const char *conn = http_req_header(hr, "Connection");
    size_t offs[ATTEMPT_MAX_HEADERS];
    size_t n = 0;

    ch->store = evbuffer_new();
    if (!ch->store) {
        return -1;
    }
    for (size_t i = 0; i < hr->nheaders && n < ATTEMPT_MAX_HEADERS; i++) {
        const char *name = hr->headers[i].name;
        if (!attempt_header_forwardable(name, conn) ||
            (no_encoding && strcasecmp(name, "Accept-Encoding") == 0)) {
            continue; /* shared and cached answers stay uncompressed */
        }
        if (strcasecmp(name, "Content-Type") == 0) {
            ch->have_ct = true;
        } else if (strcasecmp(name, "Accept") == 0) {
            ch->have_accept = true;
        }
        offs[n++] = evbuffer_get_length(ch->store);
        const char *value = hr->headers[i].value;
        evbuffer_add(ch->store, name, strlen(name));
        if (value[0]) {
            evbuffer_add(ch->store, ": ", 2);
            evbuffer_add(ch->store, value, strlen(value) + 1);
        } else {
            evbuffer_add(ch->store, ";", 2); /* curl's way to send it empty */
        }
    }
    const char *base = (const char *)evbuffer_pullup(ch->store, -1);
    for (size_t i = 0; i < n; i++) {
        ch->line[i] = base + offs[i];
    }
    ch->n = n;
    return 0;
}

void
client_headers_free(struct client_headers *ch)
{
    if (ch->store) {
        evbuffer_free(ch->store);
    }
    memset(ch, 0, sizeof(*ch));
}

const char *const credential_headers[CREDENTIAL_HEADERS] = {"Authorization", "x-api-key",
                                                             "api-key"};

/* A "Name: value" (or "Name;") line of a credential header. */
static bool
is_credential_line(const char *l)
{
    for (size_t i = 0; i < CREDENTIAL_HEADERS; i++) {
        size_t n = strlen(credential_headers[i]);
        if (strncasecmp(l, credential_headers[i], n) == 0 && (l[n] == ':' || l[n] == ';')) {
            return true;
        }
    }
    return false;
}

/* The client's lines, with Authorization replaced when the upstream has a key. */
static void
build_forward_headers(struct attempt *a, const struct attempt_spec *s)
{
    const char *key = a->up->auth_header;
    size_t n = 0;

    for (size_t i = 0; i < s->ch->n; i++) {
        const char *l = s->ch->line[i];
        if (key && is_credential_line(l)) {
            continue; /* dsgate's key goes instead: no client credential reaches the upstream */
        }
        a->fwd[n++] = l;
    }
    /* suppress what libcurl would add on its own */
    a->fwd[n++] = "Expect:";
    if (!s->ch->have_ct) {
        a->fwd[n++] = "Content-Type:";
    }
    if (!s->ch->have_accept) {
        a->fwd[n++] = "Accept:";
    }
    if (key) {
        a->fwd[n++] = key;
    }
    a->fwd[n] = NULL;
}

/*
 * An upstream with a models map gets its own name for the model: the
 * model's string in the body is replaced by the new name (JSON-escaped),
 * every other byte stays as the client sent it; answers are rewritten
 * back to the client's name.
 */
static int
rename_model(struct attempt *a, const struct attempt_spec *s)
{
    free(a->send_body);
    a->send_body = NULL;
    if (a->rewriting) {
        model_rewrite_free(&a->mrw);
        a->rewriting = false;
    }
    const char *to = s->model ? route_model_for(a->up->conf, s->model) : NULL;
    if (!to || strcmp(to, s->model) == 0 || s->model_len < 2 ||
        s->model_off + s->model_len > s->body_len) {
        return 0;
    }
    json_t *js = json_string(to);
    char *q = js ? json_dumps(js, JSON_ENCODE_ANY) : NULL;
    json_decref(js);
    if (!q) {
        return -1;
    }
    size_t ql = strlen(q);
    a->send_len = s->body_len - s->model_len + ql;
    a->send_body = malloc(a->send_len + 1);
    if (!a->send_body) {
        free(q);
        return -1;
    }
    memcpy(a->send_body, s->body, s->model_off);
    memcpy(a->send_body + s->model_off, q, ql);
    memcpy(a->send_body + s->model_off + ql, s->body + s->model_off + s->model_len,
           s->body_len - s->model_off - s->model_len);
    a->send_body[a->send_len] = '\0';
    free(q);
    if (model_rewrite_init(&a->mrw, to, s->model) < 0) {
        return -1;
    }
    a->rewriting = true;
    return 0;
}

/* ---- the head ----------------------------------------------------------- */

static void
head_defer_clear(struct attempt *a)
{
    if (a->dhead) {
        evbuffer_free(a->dhead);
        a->dhead = NULL;
    }
    a->head_deferred = false;
    a->dhead_n = 0;
    a->ws_dropped = 0;
}

/* Keep a head to send when the first data byte arrives. */
static void
head_defer(struct attempt *a, struct http_header *h, size_t n, int64_t clen)
{
    head_defer_clear(a);
    a->dhead = evbuffer_new();
    if (!a->dhead) {
        a->ops->start(a->owner, a->status, h, n, clen);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        evbuffer_add(a->dhead, h[i].name, strlen(h[i].name) + 1);
        evbuffer_add(a->dhead, h[i].value, strlen(h[i].value) + 1);
    }
    a->dhead_n = n;
    a->dhead_clen = clen;
    a->head_deferred = true;
}

static void
head_send(struct attempt *a)
{
    struct http_header h[ATTEMPT_MAX_HEADERS + REPLY_MAX_HEADERS];
    const char *p = (const char *)evbuffer_pullup(a->dhead, -1);

    for (size_t i = 0; i < a->dhead_n; i++) {
        h[i].name = p;
        p += strlen(p) + 1;
        h[i].value = p;
        p += strlen(p) + 1;
    }
    /* white space was dropped: the upstream's length no longer holds */
    a->ops->start(a->owner, a->status, h, a->dhead_n, a->ws_dropped ? -1 : a->dhead_clen);
    head_defer_clear(a);
}

static int
on_head(void *arg, int status, const struct http_header *hdrs, size_t n)
{
    struct attempt *a = arg;
    struct http_header out[ATTEMPT_MAX_HEADERS + REPLY_MAX_HEADERS];
    size_t no = 0;
    int64_t clen = -1;
    const char *retry_after = NULL, *ctype = NULL;

    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(hdrs[i].name, "Retry-After") == 0) {
            retry_after = hdrs[i].value;
        } else if (strcasecmp(hdrs[i].name, "Content-Type") == 0) {
            ctype = hdrs[i].value;
        }
    }
    a->status = status;
    a->encoded = uphead_encoded(hdrs, n);
    a->sse = ctype && strncasecmp(ctype, "text/event-stream", 17) == 0;
    if ((status == 401 || status == 402 || status == 403) && a->up->auth_header) {
        a->auth_failed = true; /* dsgate's key: kept to answer while the circuit is open */
    }
    struct attempt_head_info hi = {
        .status = status,
        .retry_after_ms = retry_after_ms(retry_after, time(NULL)),
        .ctype = ctype,
        .sse = a->sse,
    };
    if (!hi.sse && a->xfer) {
        upstream_bound_body(a->xfer, a->up->conf->body_ms); /* its first byte to its end */
    }
    switch (a->ops->head(a->owner, &hi)) {
    case AH_DROP:
        a->dropping = true; /* read and drop the body; keeps the connection */
        return UP_CONTINUE;
    case AH_LATE:
        a->late = true; /* its body carries the upstream's message */
        return UP_CONTINUE;
    case AH_GONE:
        return UP_ABORT;
    case AH_CONTINUE:
        return UP_CONTINUE;
    case AH_TAKE:
        break;
    }
    /*
     * dsgate frames the reply itself: the upstream's length only when it is
     * the answer's sole framing (curl decoded any Transfer-Encoding), else
     * chunked; the upstream's framing headers never go out.
     */
    clen = uphead_length(hdrs, n);
    for (size_t i = 0; i < n && no < ATTEMPT_MAX_HEADERS; i++) {
        const char *name = hdrs[i].name;
        if (strcasecmp(name, "Content-Length") == 0 || is_hop_by_hop(name) ||
            named_by_any_connection(hdrs, n, name)) {
            continue;
        }
        out[no++] = hdrs[i];
    }
    if (a->rewriting) {
        clen = -1; /* the model name changes the length */
    }
    if (hi.sse) {
        a->ops->start(a->owner, status, out, no, -1); /* events go as they come */
    } else {
        head_defer(a, out, no, clen);
    }
    return UP_CONTINUE;
}

/* ---- the body ------------------------------------------------------------- */

static void
tail_keep(struct attempt *a, const char *data, size_t len)
{
    if (a->head && a->head_len < USAGE_HEAD) {
        size_t n = USAGE_HEAD - a->head_len < len ? USAGE_HEAD - a->head_len : len;
        memcpy(a->head + a->head_len, data, n);
        a->head_len += n;
    }
    if (!a->tail) {
        return;
    }
    if (len >= USAGE_TAIL) {
        memcpy(a->tail, data + len - USAGE_TAIL, USAGE_TAIL);
        a->tail_len = USAGE_TAIL;
        return;
    }
    if (a->tail_len + len > USAGE_TAIL) {
        size_t drop = a->tail_len + len - USAGE_TAIL;
        memmove(a->tail, a->tail + drop, a->tail_len - drop);
        a->tail_len -= drop;
    }
    memcpy(a->tail + a->tail_len, data, len);
    a->tail_len += len;
}

/* Hand answer bytes to the owner, the held head first once data comes. */
static int
pass(struct attempt *a, const char *data, size_t len)
{
    tail_keep(a, data, len);
    if (a->head_deferred) {
        size_t ws = 0;
        while (ws < len &&
               (data[ws] == ' ' || data[ws] == '\t' || data[ws] == '\r' || data[ws] == '\n')) {
            ws++;
        }
        a->ws_dropped += ws;
        data += ws;
        len -= ws;
        if (ws > 0 && !a->held_told) {
            a->held_told = true;
            a->ops->held(a->owner);
        }
        if (len == 0) {
            return UP_CONTINUE;
        }
        head_send(a);
    }
    return len ? a->ops->data(a->owner, data, len) : UP_CONTINUE;
}

static int
pass_rewritten(struct attempt *a, const char *data, size_t len, bool flush)
{
    struct evbuffer *b = evbuffer_new();
    int rc = UP_CONTINUE;

    if (!b) {
        return UP_ABORT;
    }
    if (len > 0) {
        model_rewrite_feed(&a->mrw, data, len, b);
    }
    if (flush) {
        model_rewrite_flush(&a->mrw, b);
    }
    size_t n = evbuffer_get_length(b);
    if (n > 0) {
        rc = pass(a, (const char *)evbuffer_pullup(b, -1), n);
    }
    evbuffer_free(b);
    return rc;
}

static int
on_data(void *arg, const char *data, size_t len)
{
    struct attempt *a = arg;

    if ((a->auth_failed || a->late) && a->errbody &&
        evbuffer_get_length(a->errbody) + len <= ERRBODY_MAX) {
        evbuffer_add(a->errbody, data, len);
    }
    if (a->dropping || a->late) {
        return UP_CONTINUE;
    }
    if (a->ops->blocked(a->owner)) {
        a->paused = true;
        return UP_PAUSE;
    }
    if (a->rewriting) {
        return pass_rewritten(a, data, len, false);
    }
    return pass(a, data, len);
}

/* Count the tokens of the answer's usage, as its dialect writes them. */
static void
usage_account(struct attempt *a)
{
    if (!a->tail || !a->dialect) {
        return;
    }
    a->dialect->usage(a->head, a->head_len, a->tail, a->tail_len, a->sse, a->tokens);
    for (int i = 0; i < TOK_KINDS; i++) {
        struct gw_upstream *u = a->up;
        if (a->tokens[i] < 0) {
            continue;
        }
        if (!u->m_tokens[i]) {
            char labels[160];
            snprintf(labels, sizeof(labels), "upstream=\"%s\",kind=\"%s\"", u->conf->name,
                     token_kind_name[i]);
            u->m_tokens[i] = metrics_series("dsgate_tokens_total", labels);
        }
        metrics_series_add(u->m_tokens[i], (double)a->tokens[i]);
    }
}

/* Keep the account's answer to replay while its circuit is open. */
static void
keep_auth_body(struct attempt *a)
{
    struct gw_upstream *u = a->up;
    size_t n = evbuffer_get_length(a->errbody);
    char *b = malloc(n + 1);

    if (b) {
        evbuffer_remove(a->errbody, b, n);
        free(u->auth_body);
        u->auth_body = b;
        u->auth_body_len = n;
        u->auth_status = a->status;
    }
}

static void
on_done(void *arg, enum up_result res, const char *detail)
{
    struct attempt *a = arg;
    struct attempt_result r = {.status = a->status, .detail = detail};

    a->xfer = NULL;
    if (a->auth_failed && res == UP_OK && a->errbody && !a->late) {
        keep_auth_body(a);
    }
    if (a->late && res != UP_ABORTED) {
        r.outcome = ATT_LATE_STATUS;
        r.body = a->errbody ? (const char *)evbuffer_pullup(a->errbody, -1) : NULL;
        r.body_len = a->errbody ? evbuffer_get_length(a->errbody) : 0;
        a->ops->done(a->owner, &r);
        return;
    }
    switch (res) {
    case UP_OK:
        r.outcome = a->dropping ? ATT_DROPPED : ATT_OK;
        if (!a->dropping) {
            if (a->rewriting) {
                pass_rewritten(a, NULL, 0, true);
            }
            if (a->status == 200) {
                usage_account(a);
            }
            r.head_pending = a->head_deferred; /* an empty (or all white space) body */
        }
        break;
    case UP_CONNECT:
        r.outcome = ATT_CONNECT;
        break;
    case UP_TIMEOUT:
        r.outcome = ATT_TIMEOUT;
        break;
    case UP_BROKEN:
        r.outcome = ATT_BROKEN;
        break;
    case UP_ABORTED:
        r.outcome = ATT_ABORTED;
        break;
    case UP_INVALID:
        r.outcome = ATT_INVALID;
        break;
    }
    a->ops->done(a->owner, &r);
}

static const struct up_callbacks up_cb = {on_head, on_data, on_done};

/* ---- life ------------------------------------------------------------------ */

void
attempt_init(struct attempt *a)
{
    memset(a, 0, sizeof(*a));
    for (int i = 0; i < TOK_KINDS; i++) {
        a->tokens[i] = -1;
    }
}

int
attempt_start(struct attempt *a, struct upstream_ctx *ctx, struct gw_upstream *up,
              const struct attempt_spec *spec, const struct attempt_ops *ops, void *owner)
{
    if (a->up != up || !a->url) {
        /* the URL and the forwarded headers depend on the upstream */
        free(a->url);
        size_t ul = strlen(up->conf->url) + strlen(spec->target) + 1;
        a->url = malloc(ul);
        if (!a->url) {
            return -1;
        }
        snprintf(a->url, ul, "%s%s", up->conf->url, spec->target);
        gw_upstream_ref(up);
        if (a->up) {
            gw_upstream_unref(a->up);
        }
        a->up = up;
        build_forward_headers(a, spec);
        if (rename_model(a, spec) < 0) {
            return -1;
        }
    }
    a->dialect = spec->dialect;
    if (spec->count_usage && !a->tail) {
        a->tail = malloc(USAGE_TAIL); /* no tokens counted if this fails */
        a->head = malloc(USAGE_HEAD);
    }
    const struct conf_upstream *uc = up->conf;
    struct up_request rq = {
        .method = spec->method,
        .url = a->url,
        .headers = a->fwd,
        .body = a->send_body ? a->send_body : spec->body,
        .body_len = a->send_body ? a->send_len : spec->body_len,
        .connect_ms = uc->connect_ms,
        .total_ms = uc->total_ms,
        .ca_file = uc->ca_file,
        .insecure = uc->insecure,
    };
    head_defer_clear(a);
    a->ops = ops;
    a->owner = owner;
    a->status = 0;
    a->dropping = a->late = a->paused = a->auth_failed = a->held_told = a->encoded = false;
    a->tail_len = a->head_len = 0;
    a->sse = false;
    for (int i = 0; i < TOK_KINDS; i++) {
        a->tokens[i] = -1;
    }
    if (a->errbody) {
        evbuffer_drain(a->errbody, evbuffer_get_length(a->errbody));
    } else {
        a->errbody = evbuffer_new(); /* no error body kept if this fails */
    }
    a->xfer = upstream_start(ctx, &rq, &up_cb, a);
    return a->xfer ? 0 : -1;
}

bool
attempt_running(const struct attempt *a)
{
    return a->xfer != NULL;
}

void
attempt_cancel(struct attempt *a)
{
    if (a->xfer) {
        upstream_cancel(a->xfer);
        a->xfer = NULL;
    }
    head_defer_clear(a);
}

void
attempt_head_out(struct attempt *a)
{
    head_defer_clear(a);
}

void
attempt_send_head(struct attempt *a)
{
    if (a->head_deferred) {
        head_send(a);
    }
}

void
attempt_resume(struct attempt *a)
{
    if (a->paused && a->xfer) {
        a->paused = false;
        upstream_pause(a->xfer, false); /* may deliver data right here */
    }
}

void
attempt_free(struct attempt *a)
{
    attempt_cancel(a);
    free(a->url);
    free(a->send_body);
    free(a->tail);
    free(a->head);
    if (a->rewriting) {
        model_rewrite_free(&a->mrw);
    }
    if (a->errbody) {
        evbuffer_free(a->errbody);
    }
    if (a->up) {
        gw_upstream_unref(a->up);
    }
    memset(a, 0, sizeof(*a));
}

const char *
attempt_outcome_label(enum attempt_outcome o, int status)
{
    switch (o) {
    case ATT_OK:
    case ATT_DROPPED:
    case ATT_LATE_STATUS:
        if (status < 400) {
            return "ok";
        }
        if (status == 429 || status == 503) {
            return status == 429 ? "429" : "503";
        }
        if (status == 401 || status == 402 || status == 403) {
            return "auth";
        }
        return status < 500 ? "4xx" : "5xx";
    case ATT_CONNECT:
        return "connect_error";
    case ATT_TIMEOUT:
    case ATT_FIRST_DATA:
    case ATT_IDLE:
        return "timeout";
    case ATT_BROKEN:
        return "broken";
    case ATT_INVALID:
        return "invalid";
    case ATT_EMPTY:
        return "closed";
    case ATT_ABORTED:
    case ATT_OUTCOMES:
        break;
    }
    return "client_closed";
}
