/*
 * request: the life of one proxied request.
 *
 *   server_handle ──> request_start ──> attempt ──> upstream transfer
 *                                                     │
 *            on_head: status known ──> reply head to client
 *            on_data: body bytes ──> client (pause upstream when the client
 *                                    falls behind; resume on drain)
 *            on_done: end reply (SSE error event if the upstream broke)
 *                                                     │
 *   client leaves at any point ──> cancel transfer ──> request_finish
 *   first-data / idle timer ──> 504, or SSE error event ──> request_finish
 *
 * Timers: FIRST_DATA runs from the start of the attempt until the first
 * data byte (SSE comments and blank keep-alive lines do not count); IDLE
 * runs between data pieces after that.
 *
 * Ownership: struct request owns its body, forwarded headers, transfer and
 * timer.  http.c's request pointer is dropped when the reply ends or the
 * client leaves; the transfer pointer when it is done or cancelled.
 * request_finish() runs once, never inside a libcurl callback.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "gateway.h"
#include "http.h"
#include "log.h"
#include "sse.h"
#include "upstream.h"

#define STREAM_HIGH_WATER (256 * 1024)  /* pause the upstream above this */
#define MAX_FWD_HEADERS   128

enum req_timer { TIMER_NONE, TIMER_FIRST_DATA, TIMER_IDLE };

struct request {
    struct gateway *gw;
    struct http_req *hreq;
    uint64_t id;
    char method[16];
    char *path;                 /* copy, for the access log */
    char *url;
    enum prio prio;
    char *body;
    size_t body_len;
    struct gw_upstream *up;
    struct up_xfer *xfer;
    const char *fwd[MAX_FWD_HEADERS + 8];
    struct evbuffer *hstore;    /* storage for the forwarded header lines */
    struct event *timer;
    enum req_timer timer_kind;
    struct sse_scan scan;
    int status;
    bool sse;
    bool paused;
    bool finished;
    int attempts;
    int64_t t_start_us;
    int64_t t_up_start_us;
    int64_t t_first_data_us;
    uint64_t bytes_out;
    const char *end;            /* how it ended, for the access log */
};

static void request_finish(struct request *r);

/* ---- headers ------------------------------------------------------------ */

static bool
is_hop_by_hop(const char *name)
{
    static const char *const hop[] = {
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
        "Proxy-Connection", "TE", "Trailer", "Trailers", "Transfer-Encoding", "Upgrade",
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

/* Headers the gateway reads itself and never forwards. */
static bool
is_own_request_header(const char *name)
{
    return strcasecmp(name, "X-Priority") == 0;
}

/*
 * The forwarded request headers: client headers minus hop-by-hop, framing,
 * Host and dsgate's own; Authorization replaced when a key is configured.
 */
static int
build_forward_headers(struct request *r, const struct http_req *hr)
{
    const char *conn = http_req_header(hr, "Connection");
    size_t n = 0;
    bool have_ct = false, have_accept = false;
    size_t offs[MAX_FWD_HEADERS + 8];

    r->hstore = evbuffer_new();
    if (!r->hstore) {
        return -1;
    }
    for (size_t i = 0; i < hr->nheaders && n < MAX_FWD_HEADERS; i++) {
        const char *name = hr->headers[i].name;
        if (is_hop_by_hop(name) || named_by_connection(conn, name) ||
            strcasecmp(name, "Host") == 0 || strcasecmp(name, "Content-Length") == 0 ||
            strcasecmp(name, "Expect") == 0 || is_own_request_header(name)) {
            continue;
        }
        if (r->up->auth_header && strcasecmp(name, "Authorization") == 0) {
            continue;
        }
        if (strcasecmp(name, "Content-Type") == 0) {
            have_ct = true;
        } else if (strcasecmp(name, "Accept") == 0) {
            have_accept = true;
        }
        offs[n++] = evbuffer_get_length(r->hstore);
        if (hr->headers[i].value[0]) {
            evbuffer_add_printf(r->hstore, "%s: %s", name, hr->headers[i].value);
        } else {
            evbuffer_add_printf(r->hstore, "%s;", name);  /* curl's way to send it empty */
        }
        evbuffer_add(r->hstore, "", 1);
    }
    /* suppress what libcurl would add on its own */
    static const char *const quiet[] = { "Expect:", "Content-Type:", "Accept:" };
    for (size_t i = 0; i < 3; i++) {
        if ((i == 1 && have_ct) || (i == 2 && have_accept)) {
            continue;
        }
        offs[n++] = evbuffer_get_length(r->hstore);
        evbuffer_add(r->hstore, quiet[i], strlen(quiet[i]) + 1);
    }
    if (r->up->auth_header) {
        offs[n++] = evbuffer_get_length(r->hstore);
        evbuffer_add(r->hstore, r->up->auth_header, strlen(r->up->auth_header) + 1);
    }
    const char *base = (const char *)evbuffer_pullup(r->hstore, -1);
    for (size_t i = 0; i < n; i++) {
        r->fwd[i] = base + offs[i];
    }
    r->fwd[n] = NULL;
    return 0;
}

/* ---- timers --------------------------------------------------------------- */

static void
timer_arm(struct request *r, enum req_timer kind, int64_t ms)
{
    r->timer_kind = kind;
    if (ms <= 0) {
        evtimer_del(r->timer);
        r->timer_kind = TIMER_NONE;
        return;
    }
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    evtimer_add(r->timer, &tv);
}

static void
send_sse_error(struct request *r, const char *code, const char *message)
{
    char buf[512];

    if (!r->hreq) {
        return;
    }
    /* close any half-sent line or event first, so the error stands alone */
    int n = snprintf(buf, sizeof(buf),
                     "%sevent: error\ndata: {\"error\":{\"message\":\"%s\","
                     "\"type\":\"upstream_error\",\"code\":\"%s\"}}\n\n",
                     r->scan.mid_line ? "\n\n" : (r->scan.mid_event ? "\n" : ""), message, code);
    http_reply_data(r->hreq, buf, (size_t)n);
}

/* The upstream failed: tell the client in the best way still open to us. */
static void
fail(struct request *r, int status, const char *code, const char *message, const char *end)
{
    r->end = end;
    if (!r->hreq) {
        return;
    }
    if (!http_reply_started(r->hreq)) {
        r->status = status;
        http_reply_error(r->hreq, status, "upstream_error", code, message);
        r->hreq = NULL;
    } else if (r->sse) {
        send_sse_error(r, code, message);
        http_reply_end(r->hreq, false);
        r->hreq = NULL;
    } else {
        http_reply_end(r->hreq, true);  /* an incomplete body must not look complete */
        r->hreq = NULL;
    }
}

static void
timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct request *r = arg;

    (void)fd;
    (void)what;
    enum req_timer kind = r->timer_kind;
    r->timer_kind = TIMER_NONE;
    if (r->xfer) {
        upstream_cancel(r->xfer);
        r->xfer = NULL;
    }
    if (kind == TIMER_FIRST_DATA) {
        fail(r, 504, "upstream_timeout", "upstream sent no data within timeouts.first_data",
             "upstream_timeout");
    } else {
        fail(r, 504, "upstream_idle_timeout", "upstream stream idle beyond timeouts.idle",
             "upstream_idle");
    }
    request_finish(r);
}

/* ---- upstream callbacks ------------------------------------------------- */

static int
on_head(void *arg, int status, const struct http_header *hdrs, size_t n)
{
    struct request *r = arg;
    struct http_header out[MAX_FWD_HEADERS + 4];
    size_t no = 0;
    int64_t clen = -1;
    const char *conn = NULL;
    char attempts[16], queue_ms[16];

    if (!r->hreq) {
        return UP_ABORT;
    }
    r->status = status;
    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(hdrs[i].name, "Connection") == 0) {
            conn = hdrs[i].value;
        }
    }
    for (size_t i = 0; i < n && no < MAX_FWD_HEADERS; i++) {
        const char *name = hdrs[i].name;
        if (strcasecmp(name, "Content-Length") == 0) {
            char *e;
            errno = 0;
            long long v = strtoll(hdrs[i].value, &e, 10);
            if (errno == 0 && e != hdrs[i].value && *e == '\0' && v >= 0) {
                clen = v;
            }
            continue;
        }
        if (is_hop_by_hop(name) || named_by_connection(conn, name)) {
            continue;
        }
        if (strcasecmp(name, "Content-Type") == 0 &&
            strncasecmp(hdrs[i].value, "text/event-stream", 17) == 0) {
            r->sse = true;
        }
        out[no++] = hdrs[i];
    }
    snprintf(attempts, sizeof(attempts), "%d", r->attempts);
    snprintf(queue_ms, sizeof(queue_ms), "%d", 0);
    out[no++] = (struct http_header){ "X-Dsgate-Attempts", attempts };
    out[no++] = (struct http_header){ "X-Dsgate-Queue-Ms", queue_ms };
    out[no++] = (struct http_header){ "X-Dsgate-Upstream", r->up->conf->name };
    if (r->sse) {
        clen = -1;                  /* events are forwarded as they come */
    }
    sse_scan_init(&r->scan, r->sse);
    http_reply_start(r->hreq, status, out, no, clen);
    return UP_CONTINUE;
}

static int
on_data(void *arg, const char *data, size_t len)
{
    struct request *r = arg;

    if (!r->hreq) {
        return UP_ABORT;
    }
    if (http_reply_pending(r->hreq) > STREAM_HIGH_WATER) {
        r->paused = true;
        return UP_PAUSE;
    }
    const struct conf_upstream *uc = r->up->conf;
    if (sse_scan_feed(&r->scan, data, len)) {
        if (r->t_first_data_us == 0) {
            r->t_first_data_us = http_now_us();
        }
        timer_arm(r, TIMER_IDLE, uc->idle_ms);
    }
    http_reply_data(r->hreq, data, len);
    r->bytes_out += len;
    return UP_CONTINUE;
}

static void
on_done(void *arg, enum up_result res, const char *detail)
{
    struct request *r = arg;

    r->xfer = NULL;
    timer_arm(r, TIMER_NONE, 0);
    switch (res) {
    case UP_OK:
        r->end = "completed";
        if (r->hreq) {
            http_reply_end(r->hreq, false);
            r->hreq = NULL;
        }
        break;
    case UP_CONNECT:
        log_msg(LOG_WARN, "req=%llu up=%s: cannot reach upstream: %s",
                (unsigned long long)r->id, r->up->conf->name, detail);
        fail(r, 502, "upstream_unreachable", "upstream unreachable", "upstream_unreachable");
        break;
    case UP_TIMEOUT:
        log_msg(LOG_WARN, "req=%llu up=%s: upstream timed out: %s", (unsigned long long)r->id,
                r->up->conf->name, detail);
        fail(r, 504, "upstream_timeout", "upstream timed out", "upstream_timeout");
        break;
    case UP_BROKEN:
        log_msg(LOG_WARN, "req=%llu up=%s: upstream broke: %s", (unsigned long long)r->id,
                r->up->conf->name, detail);
        fail(r, 502, "upstream_reset", "upstream connection broke", "upstream_reset");
        break;
    case UP_ABORTED:
        if (!r->end) {
            r->end = "client_closed";
        }
        break;
    }
    request_finish(r);
}

static const struct up_callbacks up_cb = { on_head, on_data, on_done };

/* ---- client callbacks --------------------------------------------------- */

static void
on_client_close(void *arg)
{
    struct request *r = arg;

    r->hreq = NULL;
    if (!r->end) {
        r->end = r->status ? "client_closed_streaming" : "client_closed_waiting";
    }
    if (r->xfer) {
        upstream_cancel(r->xfer);
        r->xfer = NULL;
    }
    request_finish(r);
}

static void
on_client_drain(void *arg)
{
    struct request *r = arg;

    if (r->paused && r->xfer) {
        r->paused = false;
        upstream_pause(r->xfer, false);    /* may deliver data right here */
    }
}

/* ---- lifecycle ---------------------------------------------------------- */

static void
access_log(struct request *r)
{
    struct evbuffer *b;
    int64_t now = http_now_us();

    if (!log_enabled(LOG_INFO) || !(b = evbuffer_new())) {
        return;
    }
    evbuffer_add_printf(b, "{\"id\":%llu,\"method\":\"", (unsigned long long)r->id);
    log_json_escape(b, r->method);
    evbuffer_add_printf(b, "\",\"path\":\"");
    log_json_escape(b, r->path);
    evbuffer_add_printf(b,
                        "\",\"status\":%d,\"priority\":\"%s\",\"cache\":\"none\","
                        "\"upstream\":\"%s\",\"attempts\":%d,\"queue_ms\":0,"
                        "\"upstream_ms\":%lld,\"first_data_ms\":%lld,\"total_ms\":%lld,"
                        "\"bytes_in\":%zu,\"bytes_out\":%llu,\"end\":\"%s\"}",
                        r->status, conf_priority_name(r->prio), r->up->conf->name, r->attempts,
                        (long long)(r->t_up_start_us ? (now - r->t_up_start_us) / 1000 : 0),
                        (long long)(r->t_first_data_us ? (r->t_first_data_us - r->t_start_us) / 1000
                                                       : -1),
                        (long long)((now - r->t_start_us) / 1000), r->body_len,
                        (unsigned long long)r->bytes_out, r->end ? r->end : "completed");
    size_t len = evbuffer_get_length(b);
    log_access((const char *)evbuffer_pullup(b, -1), len);
    evbuffer_free(b);
}

static void
request_finish(struct request *r)
{
    if (r->finished) {
        return;
    }
    r->finished = true;
    if (r->xfer) {
        upstream_cancel(r->xfer);
        r->xfer = NULL;
    }
    if (r->hreq) {
        /* should not happen: every path ends the reply before finishing */
        http_reply_end(r->hreq, true);
        r->hreq = NULL;
    }
    if (r->up && r->up->inflight > 0) {
        r->up->inflight--;
    }
    access_log(r);
    r->gw->live_requests--;
    if (r->timer) {
        event_free(r->timer);
    }
    if (r->hstore) {
        evbuffer_free(r->hstore);
    }
    free(r->body);
    free(r->path);
    free(r->url);
    free(r);
}

static int
attempt(struct request *r)
{
    const struct conf_upstream *uc = r->up->conf;
    struct up_request rq = {
        .method = r->method,
        .url = r->url,
        .headers = r->fwd,
        .body = r->body,
        .body_len = r->body_len,
        .connect_ms = uc->connect_ms,
        .total_ms = uc->total_ms,
        .ca_file = uc->ca_file,
        .insecure = uc->insecure,
    };

    r->attempts++;
    r->t_up_start_us = http_now_us();
    r->xfer = upstream_start(r->gw->up, &rq, &up_cb, r);
    if (!r->xfer) {
        return -1;
    }
    r->up->inflight++;
    timer_arm(r, TIMER_FIRST_DATA, uc->first_data_ms);
    return 0;
}

void
request_start(struct gateway *gw, struct http_req *hreq, enum prio prio)
{
    struct request *r = calloc(1, sizeof(*r));

    if (!r) {
        http_reply_error(hreq, 500, "internal_error", "out_of_memory", "out of memory");
        return;
    }
    r->gw = gw;
    r->hreq = hreq;
    r->id = hreq->id;
    r->prio = prio;
    r->t_start_us = hreq->t_start_us;
    snprintf(r->method, sizeof(r->method), "%s", hreq->method);
    r->path = strdup(hreq->path);
    r->up = &gw->ups[0];
    gw->live_requests++;

    const char *base = r->up->conf->url;
    size_t ul = strlen(base) + strlen(hreq->target) + 1;
    r->url = malloc(ul);
    r->timer = evtimer_new(gw->base, timer_cb, r);
    if (!r->path || !r->url || !r->timer || build_forward_headers(r, hreq) < 0) {
        r->end = "internal_error";
        http_reply_error(hreq, 500, "internal_error", "out_of_memory", "out of memory");
        r->hreq = NULL;
        request_finish(r);
        return;
    }
    snprintf(r->url, ul, "%s%s", base, hreq->target);
    r->body = http_req_take_body(hreq, &r->body_len);
    http_req_set_callbacks(hreq, on_client_close, on_client_drain, r);
    if (attempt(r) < 0) {
        fail(r, 502, "upstream_unreachable", "cannot start upstream transfer", "internal_error");
        request_finish(r);
    }
}
