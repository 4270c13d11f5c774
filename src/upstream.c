/*
 * upstream: libcurl multi-socket transfers on the libevent loop.
 *
 * The shape follows curl's multi-event.c / hiperfifo.c: one context holds
 * the event base, the multi handle and one timer.  The socket callback
 * (re)assigns one persistent event per socket; the timer callback only arms
 * the libevent timer; both event callbacks call curl_multi_socket_action()
 * and then collect finished transfers.  A failed transfer fails one
 * request, never the process.
 *
 * Easy handles are reused from a small free list; connections (and TLS
 * sessions, HTTP/2 multiplexing) are shared through the multi handle.
 */
#include "upstream.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>
#include <event2/event.h>

#include "http.h"
#include "log.h"
#include "uphead.h"

#define FREE_EASY_MAX    64
#define MAX_RESP_HEADERS 128
#define MAX_RESP_HEAD    (64 * 1024) /* bytes of one head, interim heads included */

struct upstream_ctx {
    struct event_base *base;
    CURLM *multi;
    struct event *timer;
    CURL *free_easy[FREE_EASY_MAX];
    size_t nfree;
    bool reuse_easy; /* libcurl >= 8.1.0: before, a reset handle kept a freed header (curl#11101) */
};

struct up_xfer {
    struct upstream_ctx *ctx;
    CURL *easy;
    struct curl_slist *slist;
    const struct up_callbacks *cb;
    void *arg;
    bool head_done;
    bool aborted;
    bool paused;
    bool status_seen; /* a status line came: the upstream answered */
    bool want_status; /* the next header line is a status line */
    const char *invalid; /* why the answer is invalid (UP_INVALID), or NULL */
    bool tls;            /* an https upstream (HTTP/2 by ALPN possible) */
    size_t head_bytes;
    /* timeouts.body: armed at the first body byte */
    int64_t body_ms;
    struct event *body_timer;
    /* the request body, handed to curl by read_cb (see upstream_start) */
    const char *body;
    size_t body_len, body_off;
    /* a chunked answer, decoded here strictly (curl passes it raw) */
    bool chunked;
    struct uphead_chunks ck;
    char *dec;
    size_t dec_cap;
    /* response head being collected: "name\0value\0" pairs in one buffer */
    char *hbuf;
    size_t hlen, hcap;
    size_t nresp;
};

static void check_done(struct upstream_ctx *ctx);

/* ---- curl <-> libevent glue ------------------------------------------ */

static void
sock_event_cb(evutil_socket_t fd, short what, void *arg)
{
    struct upstream_ctx *ctx = arg;
    int running = 0;
    int action =
        ((what & EV_READ) ? CURL_CSELECT_IN : 0) | ((what & EV_WRITE) ? CURL_CSELECT_OUT : 0);

    curl_multi_socket_action(ctx->multi, fd, action, &running);
    check_done(ctx);
}

static void
timer_event_cb(evutil_socket_t fd, short what, void *arg)
{
    struct upstream_ctx *ctx = arg;
    int running = 0;

    (void)fd;
    (void)what;
    curl_multi_socket_action(ctx->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(ctx);
}

static int
multi_timer_cb(CURLM *multi, long timeout_ms, void *arg)
{
    struct upstream_ctx *ctx = arg;

    (void)multi;
    if (timeout_ms < 0) {
        evtimer_del(ctx->timer);
    } else {
        struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
        evtimer_add(ctx->timer, &tv);
    }
    return 0;
}

static int
multi_socket_cb(CURL *easy, curl_socket_t s, int what, void *arg, void *sockp)
{
    struct upstream_ctx *ctx = arg;
    struct event *ev = sockp;

    (void)easy;
    if (what == CURL_POLL_REMOVE) {
        if (ev) {
            event_free(ev);
            curl_multi_assign(ctx->multi, s, NULL);
        }
        return 0;
    }
    short kind = EV_PERSIST | ((what & CURL_POLL_IN) ? EV_READ : 0) |
                 ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
    if (ev) {
        event_del(ev);
        event_assign(ev, ctx->base, s, kind, sock_event_cb, ctx);
    } else {
        ev = event_new(ctx->base, s, kind, sock_event_cb, ctx);
        if (!ev) {
            return -1;
        }
        curl_multi_assign(ctx->multi, s, ev);
    }
    event_add(ev, NULL);
    return 0;
}

/* ---- transfers --------------------------------------------------------- */

const char *
upstream_result_name(enum up_result r)
{
    switch (r) {
    case UP_OK:
        return "ok";
    case UP_CONNECT:
        return "connect";
    case UP_TIMEOUT:
        return "timeout";
    case UP_BROKEN:
        return "broken";
    case UP_ABORTED:
        return "aborted";
    case UP_INVALID:
        return "invalid";
    }
    return "unknown";
}

static enum up_result
classify(CURLcode rc)
{
    switch (rc) {
    case CURLE_OK:
        return UP_OK;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_CONNECT:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
        return UP_CONNECT;
    case CURLE_OPERATION_TIMEDOUT:
        return UP_TIMEOUT;
    case CURLE_WRITE_ERROR:
    case CURLE_ABORTED_BY_CALLBACK:
        return UP_ABORTED;
    default:
        return UP_BROKEN;
    }
}

/*
 * libcurl's errors for a head it received and refused: a malformed line
 * (a NUL, no colon) or a line too large (7.88 says "out of memory" for it;
 * 8.6 and later, CURLE_TOO_LARGE).
 */
static bool
curl_rejected_head(CURLcode rc)
{
#if LIBCURL_VERSION_NUM >= 0x080600
    if (rc == CURLE_TOO_LARGE) {
        return true;
    }
#endif
    return rc == CURLE_WEIRD_SERVER_REPLY || rc == CURLE_OUT_OF_MEMORY;
}

static void
xfer_release(struct up_xfer *x)
{
    struct upstream_ctx *ctx = x->ctx;

    if (x->easy) {
        if (ctx->reuse_easy && ctx->nfree < FREE_EASY_MAX) {
            curl_easy_reset(x->easy);
            ctx->free_easy[ctx->nfree++] = x->easy;
        } else {
            curl_easy_cleanup(x->easy);
        }
    }
    if (x->body_timer) {
        event_free(x->body_timer);
    }
    curl_slist_free_all(x->slist);
    free(x->hbuf);
    free(x->dec);
    free(x);
}

/* Did the transfer reach the upstream (a connection was made)? */
static bool
connected(CURL *easy)
{
    curl_off_t t = 0;

    return curl_easy_getinfo(easy, CURLINFO_CONNECT_TIME_T, &t) == CURLE_OK && t > 0;
}

static void
check_done(struct upstream_ctx *ctx)
{
    CURLMsg *msg;
    int left;

    while ((msg = curl_multi_info_read(ctx->multi, &left))) {
        if (msg->msg != CURLMSG_DONE) {
            continue;
        }
        struct up_xfer *x = NULL;
        CURL *easy = msg->easy_handle;
        CURLcode rc = msg->data.result;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&x);
        curl_multi_remove_handle(ctx->multi, easy);
        enum up_result res = x->aborted ? UP_ABORTED : classify(rc);
        const char *detail = rc == CURLE_OK ? "" : curl_easy_strerror(rc);
        if (x->invalid) {
            res = UP_INVALID;
            detail = x->invalid;
        } else if (res == UP_BROKEN && x->status_seen && !x->head_done && curl_rejected_head(rc)) {
            res = UP_INVALID; /* curl's own verdict on a head that came */
        } else if (rc == CURLE_UNSUPPORTED_PROTOCOL && !x->status_seen && connected(easy)) {
            /* bytes that are no HTTP answer (curl: "HTTP/0.9 when not allowed"): the
             * upstream answered something invalid; it is not unreachable */
            res = UP_INVALID;
            detail = "not an HTTP answer";
        }
        if (res == UP_OK && !x->head_done) {
            res = UP_BROKEN;
        }
        if (res == UP_OK && x->chunked && !uphead_chunks_done(&x->ck)) {
            res = UP_INVALID; /* curl's decoder ended where ours did not */
            detail = "chunked body ended before its last chunk";
        }
        const struct up_callbacks *cb = x->cb;
        void *arg = x->arg;
        xfer_release(x);
        cb->on_done(arg, res, detail);
    }
}

static int
hbuf_add(struct up_xfer *x, const char *s, size_t n)
{
    if (x->hlen + n + 1 > x->hcap) {
        size_t cap = x->hcap ? x->hcap * 2 : 1024;
        while (cap < x->hlen + n + 1) {
            cap *= 2;
        }
        char *b = realloc(x->hbuf, cap);
        if (!b) {
            return -1;
        }
        x->hbuf = b;
        x->hcap = cap;
    }
    memcpy(x->hbuf + x->hlen, s, n);
    x->hlen += n;
    x->hbuf[x->hlen++] = '\0';
    return 0;
}

/* The answer is invalid: stop the transfer (check_done reports UP_INVALID). */
static size_t
head_invalid(struct up_xfer *x, const char *why)
{
    x->invalid = why;
    /* what else that connection carries cannot be trusted either */
    curl_easy_setopt(x->easy, CURLOPT_FORBID_REUSE, 1L);
    return 0;
}

static size_t
header_cb(char *p, size_t size, size_t nmemb, void *arg)
{
    struct up_xfer *x = arg;
    size_t len = size * nmemb;

    if (x->head_done) {
        return len; /* trailers: ignored */
    }
    x->head_bytes += len;
    if (x->head_bytes > MAX_RESP_HEAD) {
        return head_invalid(x, "response head too large");
    }
    if (x->want_status || !x->status_seen) {
        long ver = 0;
        curl_easy_getinfo(x->easy, CURLINFO_HTTP_VERSION, &ver);
        /* HTTP/2 only as negotiated by TLS ALPN: over plain http "HTTP/2" is text, no protocol */
        if (!uphead_status_line(p, len, x->tls && ver == CURL_HTTP_VERSION_2_0)) {
            return head_invalid(x, "invalid status line");
        }
        x->want_status = false;
        x->status_seen = true;
        x->hlen = 0; /* a new head (after 1xx) */
        x->nresp = 0;
        return len; /* libcurl parsed the status line */
    }
    struct uphead_field f;
    const char *why = NULL;
    switch (uphead_line(p, len, &f, &why)) {
    case UPHEAD_BAD:
        return head_invalid(x, why);
    case UPHEAD_FIELD:
        if (x->nresp >= MAX_RESP_HEADERS) {
            return head_invalid(x, "too many response header fields");
        }
        if (hbuf_add(x, f.name, f.name_len) < 0 || hbuf_add(x, f.value, f.value_len) < 0) {
            return 0;
        }
        x->nresp++;
        return len;
    case UPHEAD_END:
        break;
    }
    /* the empty line: the head is complete unless it was informational */
    long status = 0;
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
    if (status >= 100 && status < 200) {
        if (status != 100 && status != 102 && status != 103) {
            /* 101 (nothing asked to switch) or an unknown 1xx: libcurl would wait on */
            return head_invalid(x, "unsolicited informational response");
        }
        x->want_status = true;
        x->hlen = 0;
        x->nresp = 0;
        return len;
    }
    struct http_header hdrs[MAX_RESP_HEADERS];
    const char *q = x->hbuf;
    for (size_t i = 0; i < x->nresp; i++) {
        hdrs[i].name = q;
        q += strlen(q) + 1;
        hdrs[i].value = q;
        q += strlen(q) + 1;
    }
    if (!uphead_framing_ok(hdrs, x->nresp, &x->chunked, &why)) {
        return head_invalid(x, why);
    }
    if (x->chunked) {
        uphead_chunks_init(&x->ck);
    }
    x->head_done = true;
    if (x->cb->on_head(x->arg, (int)status, hdrs, x->nresp) == UP_ABORT) {
        x->aborted = true;
        return 0;
    }
    return len;
}

/* timeouts.body passed: end the transfer as timed out. */
static void
body_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct up_xfer *x = arg;
    const struct up_callbacks *cb = x->cb;
    void *cbarg = x->arg;

    (void)fd;
    (void)what;
    curl_multi_remove_handle(x->ctx->multi, x->easy);
    xfer_release(x);
    cb->on_done(cbarg, UP_TIMEOUT, "the answer took longer than timeouts.body");
}

void
upstream_bound_body(struct up_xfer *x, int64_t ms)
{
    x->body_ms = ms;
}

static size_t
write_cb(char *p, size_t size, size_t nmemb, void *arg)
{
    struct up_xfer *x = arg;
    size_t len = size * nmemb;

    if (!x->head_done) {
        return len;
    }
    if (x->body_ms > 0 && !x->body_timer) {
        x->body_timer = evtimer_new(x->ctx->base, body_timer_cb, x);
        if (x->body_timer) {
            struct timeval tv = {x->body_ms / 1000, (x->body_ms % 1000) * 1000};
            evtimer_add(x->body_timer, &tv);
        }
    }
    const char *data = p;
    size_t n = len;
    struct uphead_chunks saved = x->ck;
    if (x->chunked) {
        if (x->dec_cap < len) {
            char *b = realloc(x->dec, len);
            if (!b) {
                return 0;
            }
            x->dec = b;
            x->dec_cap = len;
        }
        const char *why = NULL;
        long got = uphead_chunks_feed(&x->ck, p, len, x->dec, &why);
        if (got < 0) {
            return head_invalid(x, why);
        }
        if (got == 0) {
            return len; /* framing only */
        }
        data = x->dec;
        n = (size_t)got;
    }
    int r = x->cb->on_data(x->arg, data, n);
    if (r == UP_PAUSE) {
        x->ck = saved; /* curl hands the same bytes again on resume */
        x->paused = true;
        return CURL_WRITEFUNC_PAUSE;
    }
    if (r == UP_ABORT) {
        x->aborted = true;
        return 0;
    }
    return len;
}

static size_t
read_cb(char *buf, size_t size, size_t nitems, void *arg)
{
    struct up_xfer *x = arg;
    size_t n = x->body_len - x->body_off;

    if (n > size * nitems) {
        n = size * nitems;
    }
    memcpy(buf, x->body + x->body_off, n);
    x->body_off += n;
    return n;
}

/*
 * libcurl rewinds the body to send the request again on its own when a
 * reused connection dies before the answer: a POST would reach the
 * upstream twice as one attempt.  Refusing the rewind ends the transfer
 * (CURLE_SEND_FAIL_REWIND, reported as broken) and dsgate decides and
 * counts the retry itself.
 */
static int
seek_cb(void *arg, curl_off_t offset, int origin)
{
    struct up_xfer *x = arg;

    if (origin == SEEK_SET && offset == 0 && x->body_off == 0) {
        return CURL_SEEKFUNC_OK; /* nothing was sent yet */
    }
    return CURL_SEEKFUNC_FAIL;
}

struct up_xfer *
upstream_start(struct upstream_ctx *ctx, const struct up_request *rq, const struct up_callbacks *cb,
               void *arg)
{
    struct up_xfer *x = calloc(1, sizeof(*x));

    if (!x) {
        return NULL;
    }
    x->ctx = ctx;
    x->cb = cb;
    x->arg = arg;
    x->easy = ctx->nfree > 0 ? ctx->free_easy[--ctx->nfree] : curl_easy_init();
    if (!x->easy) {
        free(x);
        return NULL;
    }
    for (const char *const *h = rq->headers; h && *h; h++) {
        struct curl_slist *n = curl_slist_append(x->slist, *h);
        if (!n) {
            xfer_release(x);
            return NULL;
        }
        x->slist = n;
    }
    CURL *e = x->easy;
    curl_easy_setopt(e, CURLOPT_URL, rq->url);
    /* chunked bodies come raw and are decoded in write_cb (uphead_chunks) */
    curl_easy_setopt(e, CURLOPT_HTTP_TRANSFER_DECODING, 0L);
    x->tls = strncasecmp(rq->url, "https:", 6) == 0;
    curl_easy_setopt(e, CURLOPT_PRIVATE, x);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    /* only the configured upstream: never a proxy from the environment */
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, rq->insecure ? 0L : 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, rq->insecure ? 0L : 2L);
    if (rq->ca_file && *rq->ca_file) {
        curl_easy_setopt(e, CURLOPT_CAINFO, rq->ca_file);
    }
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)rq->connect_ms);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)rq->total_ms);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->slist);
    if (strcmp(rq->method, "HEAD") == 0) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else if (strcmp(rq->method, "GET") == 0 && rq->body_len == 0) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else {
        if (strcmp(rq->method, "POST") != 0 || rq->body_len == 0) {
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, rq->method);
        }
        if (rq->body_len > 0 || strcmp(rq->method, "POST") == 0 || strcmp(rq->method, "PUT") == 0 ||
            strcmp(rq->method, "PATCH") == 0) {
            /* a read callback rather than POSTFIELDS, so that a resend needs our rewind */
            x->body = rq->body ? rq->body : "";
            x->body_len = rq->body_len;
            curl_easy_setopt(e, CURLOPT_POST, 1L);
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->body_len);
            curl_easy_setopt(e, CURLOPT_READFUNCTION, read_cb);
            curl_easy_setopt(e, CURLOPT_READDATA, x);
            curl_easy_setopt(e, CURLOPT_SEEKFUNCTION, seek_cb);
            curl_easy_setopt(e, CURLOPT_SEEKDATA, x);
        }
    }
    if (curl_multi_add_handle(ctx->multi, e) != CURLM_OK) {
        xfer_release(x);
        return NULL;
    }
    return x;
}

void
upstream_cancel(struct up_xfer *x)
{
    if (!x) {
        return;
    }
    curl_multi_remove_handle(x->ctx->multi, x->easy);
    xfer_release(x);
}

void
upstream_pause(struct up_xfer *x, bool pause)
{
    if (pause == x->paused) {
        return;
    }
    x->paused = pause;
    curl_easy_pause(x->easy, pause ? CURLPAUSE_RECV : CURLPAUSE_CONT);
}

struct upstream_ctx *
upstream_ctx_new(struct event_base *base)
{
    struct upstream_ctx *ctx = calloc(1, sizeof(*ctx));

    if (!ctx) {
        return NULL;
    }
    ctx->base = base;
    ctx->reuse_easy = curl_version_info(CURLVERSION_NOW)->version_num >= 0x080100;
    ctx->multi = curl_multi_init();
    ctx->timer = evtimer_new(base, timer_event_cb, ctx);
    if (!ctx->multi || !ctx->timer) {
        upstream_ctx_free(ctx);
        return NULL;
    }
    curl_multi_setopt(ctx->multi, CURLMOPT_SOCKETFUNCTION, multi_socket_cb);
    curl_multi_setopt(ctx->multi, CURLMOPT_SOCKETDATA, ctx);
    curl_multi_setopt(ctx->multi, CURLMOPT_TIMERFUNCTION, multi_timer_cb);
    curl_multi_setopt(ctx->multi, CURLMOPT_TIMERDATA, ctx);
    curl_multi_setopt(ctx->multi, CURLMOPT_MAXCONNECTS, 512L);
    curl_multi_setopt(ctx->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    return ctx;
}

void
upstream_ctx_free(struct upstream_ctx *ctx)
{
    if (!ctx) {
        return;
    }
    for (size_t i = 0; i < ctx->nfree; i++) {
        curl_easy_cleanup(ctx->free_easy[i]);
    }
    if (ctx->multi) {
        curl_multi_cleanup(ctx->multi);
    }
    if (ctx->timer) {
        event_free(ctx->timer);
    }
    free(ctx);
}
