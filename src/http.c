/*
 * http: the client-facing HTTP/1.1 server (see http.h for the contract).
 *
 * One struct http_conn per accepted socket, three libevent events (read,
 * write, deadline) and two evbuffers.  A connection runs one request at a
 * time; pipelined bytes wait in the input buffer until the reply is out.
 *
 *   IDLE --first byte--> HEAD --head parsed--> BODY --complete--> BUSY
 *    ^                     |                     |                 |
 *    |                 431/400/408           413/400/408      reply_end,
 *    +------ keep-alive <-------------------------------------- flushed
 *
 * Errors that end a connection send their reply, then LINGER: the write
 * side is shut, unread input is discarded for a moment so that the reply is
 * not destroyed by a reset, then the socket is closed.
 *
 * Application callbacks (handler, close, drain) run only from this file's
 * event callbacks, never from inside a call the application made, so the
 * application never sees re-entry.
 */
#include "http.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "log.h"

#define READ_CHUNK      16384
#define MAX_CHUNK_LINE  4096   /* a chunk-size line with extensions, or a trailer line */
/* header fields per request: what attempt.c can forward (ATTEMPT_MAX_HEADERS) */
#define MAX_NHEADERS    128
#define DRAIN_LOW_WATER (64 * 1024)
#define LINGER_MS       2000
#define ACCEPT_BURST    64
#define ACCEPT_PAUSE_MS 100

enum conn_state {
    CS_IDLE,   /* waiting for the first byte of a request */
    CS_HEAD,   /* reading the request head */
    CS_BODY,   /* reading the body */
    CS_BUSY,   /* handler owns the request; reply in progress */
    CS_LINGER, /* write side shut; discarding input until close */
};

enum chunk_state { CH_SIZE, CH_DATA, CH_DATA_END, CH_TRAILER };

struct http_conn {
    struct http_server *srv;
    struct http_conn *prev, *next;
    int fd;
    enum conn_state state;
    struct event *ev_read;
    struct event *ev_write;
    struct event *ev_timer;
    struct evbuffer *in;
    struct evbuffer *out;
    bool read_paused;
    bool write_armed;
    bool write_failed; /* a write from outside an event failed */
    bool peer_eof;     /* the client shut its side; answer what is buffered */

    /* the current request */
    struct http_req req;
    char *head; /* copy of the head; headers point into it */
    struct http_header *hdrs;
    size_t hdrs_cap;
    bool keep_alive;
    bool expect_continue;
    int64_t content_length; /* -1: none */
    bool chunked;
    enum chunk_state ch_state;
    uint64_t ch_left;
    size_t trailer_bytes; /* trailer lines so far */
    char *body;
    size_t body_len, body_cap;

    /* the reply */
    bool reply_started;
    bool reply_chunked;
    bool reply_no_body;
    bool reply_ended;
    bool reply_close; /* close the connection after this reply */
    bool drain_armed;
    http_close_fn on_close;
    http_drain_fn on_drain;
    void *cb_arg;
};

struct http_server {
    struct event_base *base;
    int fd;
    struct event *ev_accept;
    struct event *ev_resume;
    struct http_limits lim;
    http_handler_fn handler;
    void *arg;
    http_reject_fn on_reject;
    void *reject_arg;
    http_error_fn error_body;
    struct http_conn *conns;
    size_t nconns;
    bool close_idle;
    uint64_t next_id;
    char addr[80];
};

static void conn_read_cb(evutil_socket_t fd, short what, void *arg);
static void conn_write_cb(evutil_socket_t fd, short what, void *arg);
static void conn_timer_cb(evutil_socket_t fd, short what, void *arg);
static void conn_process(struct http_conn *c);
static void conn_fail(struct http_conn *c, int status, const char *code, const char *msg);

int64_t
http_now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

const char *
http_reason(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 206:
        return "Partial Content";
    case 301:
        return "Moved Permanently";
    case 302:
        return "Found";
    case 304:
        return "Not Modified";
    case 307:
        return "Temporary Redirect";
    case 308:
        return "Permanent Redirect";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 402:
        return "Payment Required";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 411:
        return "Length Required";
    case 413:
        return "Content Too Large";
    case 415:
        return "Unsupported Media Type";
    case 417:
        return "Expectation Failed";
    case 422:
        return "Unprocessable Content";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Unknown";
    }
}

static void
timer_set(struct http_conn *c, int64_t ms)
{
    if (ms <= 0) {
        evtimer_del(c->ev_timer);
        return;
    }
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(c->ev_timer, &tv);
}

/* ---- connection lifetime ---------------------------------------------- */

static void
req_reset(struct http_conn *c)
{
    free(c->head);
    c->head = NULL;
    free(c->body);
    c->body = NULL;
    c->body_len = c->body_cap = 0;
    free((char *)c->req.path);
    memset(&c->req, 0, sizeof(c->req));
    c->req.http_minor = 1;
    c->keep_alive = false;
    c->expect_continue = false;
    c->content_length = -1;
    c->chunked = false;
    c->ch_state = CH_SIZE;
    c->ch_left = 0;
    c->trailer_bytes = 0;
    c->reply_started = c->reply_chunked = c->reply_no_body = false;
    c->reply_ended = c->reply_close = c->drain_armed = false;
    c->on_close = NULL;
    c->on_drain = NULL;
    c->cb_arg = NULL;
}

static void
conn_free(struct http_conn *c)
{
    struct http_server *s = c->srv;

    if (c->prev) {
        c->prev->next = c->next;
    } else {
        s->conns = c->next;
    }
    if (c->next) {
        c->next->prev = c->prev;
    }
    s->nconns--;
    event_free(c->ev_read);
    event_free(c->ev_write);
    event_free(c->ev_timer);
    evbuffer_free(c->in);
    evbuffer_free(c->out);
    close(c->fd);
    req_reset(c);
    free(c->hdrs);
    free(c);
}

/* The peer is gone or the socket failed: tell the handler, then free. */
static void
conn_lost(struct http_conn *c)
{
    if (c->state == CS_BUSY && !c->reply_ended && c->on_close) {
        http_close_fn fn = c->on_close;
        c->on_close = NULL;
        fn(c->cb_arg);
    }
    conn_free(c);
}

static void
conn_linger(struct http_conn *c)
{
    c->state = CS_LINGER;
    shutdown(c->fd, SHUT_WR);
    evbuffer_drain(c->in, evbuffer_get_length(c->in));
    if (c->read_paused) {
        event_add(c->ev_read, NULL);
        c->read_paused = false;
    }
    timer_set(c, LINGER_MS);
}

static void
conn_pause_read(struct http_conn *c, bool pause)
{
    if (pause && !c->read_paused) {
        event_del(c->ev_read);
        c->read_paused = true;
    } else if (!pause && c->read_paused) {
        event_add(c->ev_read, NULL);
        c->read_paused = false;
    }
}

/* The reply is fully written: next request, or close. */
static void
conn_reply_done(struct http_conn *c, bool from_event)
{
    if (c->reply_close || !c->keep_alive || c->srv->close_idle ||
        (c->peer_eof && evbuffer_get_length(c->in) == 0)) {
        conn_linger(c);
        return;
    }
    req_reset(c);
    c->state = CS_IDLE;
    conn_pause_read(c, c->peer_eof);
    timer_set(c, c->srv->lim.idle_timeout_ms);
    if (evbuffer_get_length(c->in) > 0) {
        if (from_event) {
            conn_process(c);
        } else {
            event_active(c->ev_read, EV_READ, 0);
        }
    }
}

/*
 * Write what is queued.  Returns -1 when the connection was lost (and
 * freed, only when FROM_EVENT), 0 otherwise.
 */
static int
conn_flush(struct http_conn *c, bool from_event)
{
    if (c->write_failed) {
        evbuffer_drain(c->out, evbuffer_get_length(c->out));
        return -1;
    }
    while (evbuffer_get_length(c->out) > 0) {
        int n = evbuffer_write(c->out, c->fd);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                break;
            }
            if (errno == EINTR) {
                continue;
            }
            if (from_event) {
                conn_lost(c);
            } else if (!c->write_failed) {
                /* report it from the loop, not inside the caller */
                evbuffer_drain(c->out, evbuffer_get_length(c->out));
                c->write_failed = true;
                if (c->write_armed) {
                    event_del(c->ev_write);
                }
                event_active(c->ev_write, EV_WRITE, 0);
                c->write_armed = true;
            }
            return -1;
        }
        if (n == 0) {
            break;
        }
    }
    if (evbuffer_get_length(c->out) > 0) {
        if (!c->write_armed) {
            event_add(c->ev_write, NULL);
            c->write_armed = true;
        }
        return 0;
    }
    if (c->write_armed) {
        event_del(c->ev_write);
        c->write_armed = false;
    }
    if (c->state == CS_BUSY && c->reply_ended) {
        conn_reply_done(c, from_event);
    }
    return 0;
}

static void
conn_write_cb(evutil_socket_t fd, short what, void *arg)
{
    struct http_conn *c = arg;

    (void)fd;
    (void)what;
    c->write_armed = false;
    if (c->write_failed) {
        conn_lost(c);
        return;
    }
    if (conn_flush(c, true) < 0) {
        return;
    }
    if (c->state == CS_BUSY && !c->reply_ended && c->drain_armed &&
        evbuffer_get_length(c->out) < DRAIN_LOW_WATER) {
        c->drain_armed = false;
        if (c->on_drain) {
            c->on_drain(c->cb_arg);
        }
    }
}

static void
conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct http_conn *c = arg;

    (void)fd;
    (void)what;
    switch (c->state) {
    case CS_IDLE:
    case CS_LINGER:
        conn_free(c);
        return;
    case CS_HEAD:
        conn_fail(c, 408, "request_timeout", "request head not received in time");
        return;
    case CS_BODY:
        conn_fail(c, 408, "request_timeout", "request body not received in time");
        return;
    case CS_BUSY:
        return;
    }
}

/* Answer an error while reading a request, then close. */
static void
conn_fail(struct http_conn *c, int status, const char *code, const char *msg)
{
    c->state = CS_BUSY;
    c->keep_alive = false;
    evtimer_del(c->ev_timer);
    conn_pause_read(c, true);
    if (c->srv->on_reject && c->req.t_start_us) {
        c->req.id = ++c->srv->next_id;
        c->srv->on_reject(&c->req, status, code, c->srv->reject_arg);
    }
    http_reply_error(&c->req, status, "invalid_request_error", code, msg);
}

/* ---- parsing ---------------------------------------------------------- */

static bool
is_tchar(unsigned char ch)
{
    return isalnum(ch) || (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

/*
 * Is the N-byte field name S the name WANT (with '-'), compared without
 * case and with '_' taken for '-'?  (Content_Length is Content-Length to
 * some servers and CGI-style gateways.)
 */
static bool
name_is_loosely(const char *s, size_t n, const char *want)
{
    if (strlen(want) != n) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char a = s[i] == '_' ? '-' : s[i];
        if (tolower((unsigned char)a) != tolower((unsigned char)want[i])) {
            return false;
        }
    }
    return true;
}

static char *
trim(char *s, char *end)
{
    while (s < end && (*s == ' ' || *s == '\t')) {
        s++;
    }
    while (end > s && (end[-1] == ' ' || end[-1] == '\t')) {
        end--;
    }
    *end = '\0';
    return s;
}

/* Path hygiene (design.md): no dot segments, no encoded / \ . */
static bool
path_is_safe(const char *p)
{
    if (p[0] != '/') {
        return false;
    }
    for (const char *s = p; *s; s++) {
        if (*s == '\\' || *s == '#') {
            return false;
        }
        if (*s == '%') {
            if (!isxdigit((unsigned char)s[1]) || !isxdigit((unsigned char)s[2])) {
                return false;
            }
            char h = (char)tolower((unsigned char)s[1]), l = (char)tolower((unsigned char)s[2]);
            if ((h == '2' && (l == 'f' || l == 'e')) || (h == '5' && l == 'c')) {
                return false;
            }
        }
        if (*s == '/') {
            const char *seg = s + 1;
            size_t n = strcspn(seg, "/");
            if ((n == 1 && seg[0] == '.') || (n == 2 && seg[0] == '.' && seg[1] == '.')) {
                return false;
            }
        }
    }
    return true;
}

/*
 * Parse the head in c->head (LEN bytes, lines end in LF or CRLF).
 * Returns 0, or an HTTP status with *CODE and *MSG set.
 */
static int
parse_head(struct http_conn *c, size_t len, const char **code, const char **msg)
{
    char *p = c->head, *end = c->head + len;
    char *line_end;
    size_t nh = 0;
    bool host_seen = false, cl_seen = false, te_seen = false, close_seen = false;
    struct http_req *r = &c->req;

    *code = "invalid_request";
    /* bare CR or NUL anywhere in the head is refused */
    for (char *q = p; q < end; q++) {
        if (*q == '\0' || (*q == '\r' && (q + 1 == end || q[1] != '\n'))) {
            *msg = "invalid character in request head";
            return 400;
        }
    }

    /* request line */
    line_end = memchr(p, '\n', (size_t)(end - p));
    if (!line_end) {
        *msg = "malformed request line";
        return 400;
    }
    char *le = line_end > p && line_end[-1] == '\r' ? line_end - 1 : line_end;
    *le = '\0';
    char *sp1 = strchr(p, ' ');
    char *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
    if (!sp1 || !sp2 || strchr(sp2 + 1, ' ') || sp1 == p || sp2 == sp1 + 1 || sp1 - p > 16) {
        *msg = "malformed request line";
        return 400;
    }
    *sp1 = *sp2 = '\0';
    for (char *q = p; *q; q++) {
        if (!is_tchar((unsigned char)*q)) {
            *msg = "malformed request method";
            return 400;
        }
    }
    r->method = p;
    if (strcmp(sp2 + 1, "HTTP/1.1") == 0) {
        r->http_minor = 1;
    } else if (strcmp(sp2 + 1, "HTTP/1.0") == 0) {
        r->http_minor = 0;
    } else if (strncmp(sp2 + 1, "HTTP/", 5) == 0 && isdigit((unsigned char)sp2[6])) {
        *code = "http_version_not_supported";
        *msg = "only HTTP/1.0 and HTTP/1.1 are supported";
        return 505;
    } else {
        *msg = "malformed request line";
        return 400;
    }
    c->keep_alive = r->http_minor == 1;
    r->target = sp1 + 1;
    for (const char *q = r->target; *q; q++) {
        if ((unsigned char)*q <= 0x20 || (unsigned char)*q >= 0x7f) {
            *msg = "invalid character in request target";
            return 400;
        }
    }
    if (strcmp(r->method, "CONNECT") == 0) {
        *code = "method_not_allowed";
        *msg = "CONNECT is not supported";
        return 405;
    }
    if (r->target[0] != '/') {
        *msg = "request target must be origin-form (/path?query)";
        return 400;
    }

    /* header fields */
    p = line_end + 1;
    while (p < end) {
        line_end = memchr(p, '\n', (size_t)(end - p));
        if (!line_end) {
            break;
        }
        le = line_end > p && line_end[-1] == '\r' ? line_end - 1 : line_end;
        if (le == p) {
            break; /* the empty line */
        }
        if (*p == ' ' || *p == '\t') {
            *msg = "obsolete header line folding is not accepted";
            return 400;
        }
        char *colon = memchr(p, ':', (size_t)(le - p));
        if (!colon || colon == p) {
            *msg = "malformed header line";
            return 400;
        }
        for (char *q = p; q < colon; q++) {
            if (!is_tchar((unsigned char)*q)) {
                *msg = "invalid character in header name";
                return 400;
            }
        }
        *colon = '\0';
        char *value = trim(colon + 1, le);
        for (char *q = value; *q; q++) {
            unsigned char ch = (unsigned char)*q;
            if ((ch < 0x20 && ch != '\t') || ch == 0x7f) {
                *msg = "invalid character in header value";
                return 400;
            }
        }
        if (nh == MAX_NHEADERS) {
            *code = "request_header_fields_too_large";
            *msg = "too many header fields";
            return 431;
        }
        if (nh == c->hdrs_cap) {
            size_t cap = c->hdrs_cap ? c->hdrs_cap * 2 : 32;
            struct http_header *h = realloc(c->hdrs, cap * sizeof(*h));
            if (!h) {
                *code = "internal_error";
                *msg = "out of memory";
                return 500;
            }
            c->hdrs = h;
            c->hdrs_cap = cap;
        }
        c->hdrs[nh].name = p;
        c->hdrs[nh].value = value;
        nh++;

        if ((name_is_loosely(p, (size_t)(colon - p), "Content-Length") &&
             strcasecmp(p, "Content-Length") != 0) ||
            (name_is_loosely(p, (size_t)(colon - p), "Transfer-Encoding") &&
             strcasecmp(p, "Transfer-Encoding") != 0)) {
            *msg = "Content_Length or Transfer_Encoding is ambiguous";
            return 400;
        }
        if (strcasecmp(p, "Content-Length") == 0) {
            char *e;
            if (cl_seen || !*value || strspn(value, "0123456789") != strlen(value) ||
                strlen(value) > 15) {
                *msg = "invalid or repeated Content-Length";
                return 400;
            }
            cl_seen = true;
            c->content_length = (int64_t)strtoll(value, &e, 10);
        } else if (strcasecmp(p, "Transfer-Encoding") == 0) {
            if (te_seen || strcasecmp(value, "chunked") != 0) {
                *code = "unsupported_transfer_encoding";
                *msg = "only a single Transfer-Encoding: chunked is accepted";
                return 400;
            }
            te_seen = true;
            c->chunked = true;
        } else if (strcasecmp(p, "Host") == 0) {
            if (host_seen) {
                *msg = "repeated Host header";
                return 400;
            }
            host_seen = true;
        } else if (strcasecmp(p, "Connection") == 0) {
            /* a list of tokens, read in place: `close` counts wherever it is */
            for (const char *t = value; *t;) {
                size_t n = strcspn(t, ", \t");
                if (n == 5 && strncasecmp(t, "close", 5) == 0) {
                    c->keep_alive = false;
                    close_seen = true;
                } else if (n == 10 && strncasecmp(t, "keep-alive", 10) == 0 &&
                           r->http_minor == 0 && !close_seen) {
                    c->keep_alive = true;
                }
                t += n;
                t += strspn(t, ", \t");
            }
        } else if (strcasecmp(p, "Expect") == 0) {
            if (strcasecmp(value, "100-continue") != 0) {
                *code = "expectation_failed";
                *msg = "unsupported Expect value";
                return 417;
            }
            c->expect_continue = r->http_minor == 1;
        }
        p = line_end + 1;
    }
    r->headers = c->hdrs;
    r->nheaders = nh;
    if (te_seen && (cl_seen || r->http_minor == 0)) {
        *msg = "Transfer-Encoding with Content-Length or HTTP/1.0";
        return 400;
    }
    if ((c->content_length > 0 || c->chunked) &&
        (strcmp(r->method, "GET") == 0 || strcmp(r->method, "HEAD") == 0)) {
        *msg = "GET and HEAD requests take no body";
        return 400;
    }
    if (r->http_minor == 1 && !host_seen) {
        *msg = "missing Host header";
        return 400;
    }
    /* split target into path and query */
    const char *q = strchr(r->target, '?');
    size_t plen = q ? (size_t)(q - r->target) : strlen(r->target);
    char *path = malloc(plen + 1);
    if (!path) {
        *code = "internal_error";
        *msg = "out of memory";
        return 500;
    }
    memcpy(path, r->target, plen);
    path[plen] = '\0';
    r->path = path;
    r->query = q ? q + 1 : "";
    if (!path_is_safe(path)) {
        *code = "invalid_path";
        *msg = "path with dot segments or encoded separators is not accepted";
        return 400;
    }
    return 0;
}

static int
body_reserve(struct http_conn *c, size_t need)
{
    if (c->body_len + need + 1 <= c->body_cap) {
        return 0;
    }
    size_t cap = c->body_cap ? c->body_cap : 4096;
    while (cap < c->body_len + need + 1) {
        cap *= 2;
    }
    char *b = realloc(c->body, cap);
    if (!b) {
        return -1;
    }
    c->body = b;
    c->body_cap = cap;
    return 0;
}

/*
 * After the hex digits of a chunk size: chunk-ext (RFC 9112 7.1.1) with no
 * white space around ';' or '=' (llhttp refuses it too):
 *   *( ";" token [ "=" ( token / quoted-string ) ] )
 * Anything else after the size (`5 xyz`, `5 6`, `5 `) is refused: a
 * parser that stops at the first non-digit reads another chunk size.
 */
static bool
chunk_ext_valid(const char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        if (s[i++] != ';') {
            return false;
        }
        size_t name = i;
        while (i < n && is_tchar((unsigned char)s[i])) {
            i++;
        }
        if (i == name) {
            return false;
        }
        if (i == n || s[i] == ';') {
            continue;
        }
        if (s[i++] != '=' || i == n) {
            return false;
        }
        if (s[i] != '"') {
            size_t v = i;
            while (i < n && is_tchar((unsigned char)s[i])) {
                i++;
            }
            if (i == v) {
                return false;
            }
            continue;
        }
        /* quoted-string: qdtext / quoted-pair, then the closing quote */
        for (i++;; i++) {
            if (i == n) {
                return false;
            }
            unsigned char ch = (unsigned char)s[i];
            if (ch == '"') {
                i++;
                break;
            }
            if (ch == '\\') {
                if (++i == n) {
                    return false;
                }
                ch = (unsigned char)s[i];
            }
            if ((ch < 0x20 && ch != '\t') || ch == 0x7f) {
                return false;
            }
        }
    }
    return true;
}

/*
 * One trailer line (without its CRLF), N bytes: a field like those of the
 * head (token ":" value, no control bytes but HTAB, no obs-fold), and not
 * one that frames the message.  A pipelined request line after a last
 * chunk that lacks its final CRLF is caught here: it has no colon, or a
 * space before its first one.
 */
static bool
trailer_valid(const char *s, size_t n)
{
    const char *colon = memchr(s, ':', n);

    if (!colon || colon == s) {
        return false;
    }
    for (const char *q = s; q < colon; q++) {
        if (!is_tchar((unsigned char)*q)) {
            return false;
        }
    }
    for (const char *q = colon + 1; q < s + n; q++) {
        unsigned char ch = (unsigned char)*q;
        if ((ch < 0x20 && ch != '\t') || ch == 0x7f) {
            return false;
        }
    }
    size_t nl = (size_t)(colon - s);
    return !(name_is_loosely(s, nl, "Content-Length") ||
             name_is_loosely(s, nl, "Transfer-Encoding") || name_is_loosely(s, nl, "Host"));
}

/* Move body bytes from the input buffer.  1: complete, 0: need more, <0: status. */
static int
read_body(struct http_conn *c, const char **msg)
{
    size_t max = c->srv->lim.max_body;

    if (!c->chunked) {
        size_t want = (size_t)c->content_length - c->body_len;
        size_t avail = evbuffer_get_length(c->in);
        size_t n = avail < want ? avail : want;
        if (n > 0) {
            evbuffer_remove(c->in, c->body + c->body_len, n);
            c->body_len += n;
        }
        return c->body_len == (size_t)c->content_length ? 1 : 0;
    }
    for (;;) {
        size_t avail = evbuffer_get_length(c->in);
        if (c->ch_state == CH_DATA) {
            if (avail == 0) {
                return 0;
            }
            size_t n = avail < c->ch_left ? avail : (size_t)c->ch_left;
            if (body_reserve(c, n) < 0) {
                *msg = "out of memory";
                return -500;
            }
            evbuffer_remove(c->in, c->body + c->body_len, n);
            c->body_len += n;
            c->ch_left -= n;
            if (c->ch_left == 0) {
                c->ch_state = CH_DATA_END;
            }
            continue;
        }
        /* the other states read whole lines, each ending in CRLF */
        struct evbuffer_ptr eol = evbuffer_search_eol(c->in, NULL, NULL, EVBUFFER_EOL_LF);
        if (eol.pos < 0) {
            if (avail >= MAX_CHUNK_LINE) {
                *msg = "chunk line too long";     /* same verdict as with its end in sight */
                return -400;
            }
            return 0;
        }
        char line[MAX_CHUNK_LINE + 1];
        size_t ll = (size_t)eol.pos + 1;
        if (ll > MAX_CHUNK_LINE) {
            *msg = "chunk line too long";
            return -400;
        }
        evbuffer_remove(c->in, line, ll);
        if (ll < 2 || line[ll - 2] != '\r') {
            *msg = "bare LF in chunked framing";
            return -400;
        }
        size_t content = ll - 2;
        line[content] = '\0';
        switch (c->ch_state) {
        case CH_SIZE: {
            size_t hexlen = 0;
            while (hexlen < content && isxdigit((unsigned char)line[hexlen])) {
                hexlen++;
            }
            if (hexlen == 0 || hexlen > 12 ||
                (hexlen < content && !chunk_ext_valid(line + hexlen, content - hexlen))) {
                *msg = "malformed chunk size";
                return -400;
            }
            c->ch_left = strtoull(line, NULL, 16);
            if (c->body_len + c->ch_left > max) {
                *msg = "request body exceeds limits.max_body";
                return -413;
            }
            c->ch_state = c->ch_left == 0 ? CH_TRAILER : CH_DATA;
            break;
        }
        case CH_DATA_END:
            if (content != 0) {
                *msg = "malformed chunked body";
                return -400;
            }
            c->ch_state = CH_SIZE;
            break;
        case CH_TRAILER:
            if (content == 0) {
                return 1;
            }
            /* trailer fields are dropped, but they must be fields */
            c->trailer_bytes += ll;
            if (c->trailer_bytes > c->srv->lim.max_headers) {
                *msg = "trailer section exceeds limits.max_headers";
                return -431;
            }
            if (!trailer_valid(line, content)) {
                *msg = "malformed trailer field";
                return -400;
            }
            break;
        case CH_DATA:
            break;
        }
    }
}

static void
dispatch(struct http_conn *c)
{
    struct http_server *s = c->srv;

    c->state = CS_BUSY;
    evtimer_del(c->ev_timer);
    if (!c->body) {
        c->body = malloc(1);
        if (!c->body) {
            conn_fail(c, 500, "internal_error", "out of memory");
            return;
        }
    }
    c->body[c->body_len] = '\0';
    c->req.body = c->body;
    c->req.body_len = c->body_len;
    c->req.id = ++s->next_id;
    /* keep noticing a client that leaves, but do not hoard pipelined input */
    if (evbuffer_get_length(c->in) > s->lim.max_headers) {
        conn_pause_read(c, true);
    }
    s->handler(&c->req, s->arg);
}

/*
 * Where the request head in the input ends: its length including blank
 * lines before it (tolerated, RFC 9112 2.2), or 0 when it is not complete
 * within the bytes scanned.  *D, *SCAN and *SKIP describe the scanned
 * bytes and the blank lines.
 */
static size_t
head_end(struct http_conn *c, unsigned char **d, size_t *scan, size_t *skip)
{
    size_t avail = evbuffer_get_length(c->in), max = c->srv->lim.max_headers;

    *scan = avail < max + 4 ? avail : max + 4;
    *d = evbuffer_pullup(c->in, (ssize_t)*scan);
    *skip = 0;
    while (*skip < *scan && ((*d)[*skip] == '\r' || (*d)[*skip] == '\n')) {
        (*skip)++;
    }
    for (size_t i = *skip; i + 1 < *scan; i++) {
        const unsigned char *p = *d;
        if (p[i] == '\n' &&
            (p[i + 1] == '\n' || (p[i + 1] == '\r' && i + 2 < *scan && p[i + 2] == '\n'))) {
            return i + (p[i + 1] == '\n' ? 2 : 3);
        }
    }
    return 0;
}

/* A body is announced: check its size and make room.  0 or a status. */
static int
body_begin(struct http_conn *c)
{
    if (c->content_length > (int64_t)c->srv->lim.max_body) {
        return 413;
    }
    if (!c->chunked) {
        c->body = malloc((size_t)c->content_length + 1);
        c->body_cap = (size_t)c->content_length + 1;
        if (!c->body) {
            return 500;
        }
    }
    return 0;
}

/* Make as much progress as the buffered input allows. */
static void
conn_process(struct http_conn *c)
{
    struct http_server *s = c->srv;
    const char *code, *msg;

    if (c->state == CS_IDLE) {
        if (evbuffer_get_length(c->in) == 0) {
            return;
        }
        c->state = CS_HEAD;
        c->req.t_start_us = http_now_us();
        timer_set(c, s->lim.header_timeout_ms);
    }
    if (c->state == CS_HEAD) {
        size_t scan, skip;
        unsigned char *d;
        size_t hlen = head_end(c, &d, &scan, &skip);
        if (hlen == 0) {
            if (scan - skip > s->lim.max_headers) {
                conn_fail(c, 431, "request_header_fields_too_large",
                          "request head exceeds limits.max_headers");
            } else if (skip > 0) {
                evbuffer_drain(c->in, skip);
            }
            return;
        }
        if (hlen - skip > s->lim.max_headers) {
            conn_fail(c, 431, "request_header_fields_too_large",
                      "request head exceeds limits.max_headers");
            return;
        }
        c->head = malloc(hlen - skip + 1);
        if (!c->head) {
            conn_fail(c, 500, "internal_error", "out of memory");
            return;
        }
        memcpy(c->head, d + skip, hlen - skip);
        c->head[hlen - skip] = '\0';
        evbuffer_drain(c->in, hlen);
        int st = parse_head(c, hlen - skip, &code, &msg);
        if (st != 0) {
            conn_fail(c, st, code, msg);
            return;
        }
        if (c->content_length > 0 || c->chunked) {
            st = body_begin(c);
            if (st != 0) {
                conn_fail(c, st, st == 413 ? "request_too_large" : "internal_error",
                          st == 413 ? "request body exceeds limits.max_body" : "out of memory");
                return;
            }
            if (c->expect_continue && evbuffer_get_length(c->in) == 0) {
                static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
                evbuffer_add(c->out, cont, sizeof(cont) - 1);
                if (conn_flush(c, false) < 0) {
                    return;
                }
            }
            c->state = CS_BODY;
            timer_set(c, s->lim.body_timeout_ms);
        } else {
            dispatch(c);
            return;
        }
    }
    if (c->state == CS_BODY) {
        int r = read_body(c, &msg);
        if (r < 0) {
            conn_fail(c, -r, -r == 413 ? "request_too_large" : "invalid_request", msg);
            return;
        }
        if (r == 1) {
            dispatch(c);
        }
    }
}

static void
conn_read_cb(evutil_socket_t fd, short what, void *arg)
{
    struct http_conn *c = arg;
    int n;

    (void)what;
    for (;;) {
        n = evbuffer_read(c->in, fd, READ_CHUNK);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        break;
    }
    bool reading = c->state == CS_IDLE || c->state == CS_HEAD || c->state == CS_BODY;
    if (n == 0 && reading && evbuffer_get_length(c->in) > 0) {
        /* the client sent its last requests and shut its side: answer them, then close */
        c->peer_eof = true;
        conn_pause_read(c, true);
        conn_process(c);
        return;
    }
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
        if (c->state == CS_BUSY && c->reply_ended) {
            /* the reply is complete; finish writing it, then close */
            c->reply_close = true;
            conn_pause_read(c, true);
            return;
        }
        conn_lost(c);
        return;
    }
    if (n < 0) {
        /* nothing new; a pipelined request may wait in the buffer (event_active) */
        if (reading && evbuffer_get_length(c->in) > 0) {
            conn_process(c);
        }
        return;
    }
    switch (c->state) {
    case CS_LINGER:
        evbuffer_drain(c->in, evbuffer_get_length(c->in));
        return;
    case CS_BUSY:
        if (evbuffer_get_length(c->in) > c->srv->lim.max_headers) {
            conn_pause_read(c, true);
        }
        return;
    default:
        conn_process(c);
    }
}

/* ---- replies ---------------------------------------------------------- */

static struct http_conn *
req_conn(const struct http_req *r)
{
    return (struct http_conn *)((char *)r - offsetof(struct http_conn, req));
}

const char *
http_req_header(const struct http_req *r, const char *name)
{
    for (size_t i = 0; i < r->nheaders; i++) {
        if (strcasecmp(r->headers[i].name, name) == 0) {
            return r->headers[i].value;
        }
    }
    return NULL;
}

void
http_req_set_callbacks(struct http_req *r, http_close_fn on_close, http_drain_fn on_drain,
                       void *arg)
{
    struct http_conn *c = req_conn(r);

    c->on_close = on_close;
    c->on_drain = on_drain;
    c->cb_arg = arg;
}

char *
http_req_take_body(struct http_req *r, size_t *len)
{
    struct http_conn *c = req_conn(r);
    char *b = c->body;

    *len = c->body_len;
    c->body = NULL;
    c->body_len = c->body_cap = 0;
    r->body = NULL;
    r->body_len = 0;
    return b;
}

static void
add_uint(struct evbuffer *b, uint64_t v)
{
    char tmp[24];
    int i = (int)sizeof(tmp);

    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    evbuffer_add(b, tmp + i, sizeof(tmp) - (size_t)i);
}

void
http_reply_start(struct http_req *r, int status, const struct http_header *headers, size_t nheaders,
                 int64_t content_length)
{
    struct http_conn *c = req_conn(r);
    struct evbuffer *o = c->out;
    static const char crlf[] = "\r\n";

    if (c->reply_started) {
        return;
    }
    c->reply_started = true;
    c->reply_no_body =
        (r->method && strcmp(r->method, "HEAD") == 0) || status == 204 || status == 304;
    if (content_length < 0 && !c->reply_no_body) {
        if (r->http_minor == 1) {
            c->reply_chunked = true;
        } else {
            c->keep_alive = false;
        }
    }
    if (c->srv->close_idle) {
        c->keep_alive = false;
    }
    evbuffer_add(o, r->http_minor == 1 ? "HTTP/1.1 " : "HTTP/1.0 ", 9);
    add_uint(o, (uint64_t)status);
    evbuffer_add(o, " ", 1);
    const char *reason = http_reason(status);
    evbuffer_add(o, reason, strlen(reason));
    evbuffer_add(o, crlf, 2);
    for (size_t i = 0; i < nheaders; i++) {
        evbuffer_add(o, headers[i].name, strlen(headers[i].name));
        evbuffer_add(o, ": ", 2);
        evbuffer_add(o, headers[i].value, strlen(headers[i].value));
        evbuffer_add(o, crlf, 2);
    }
    if (c->reply_chunked) {
        static const char te[] = "Transfer-Encoding: chunked\r\n";
        evbuffer_add(o, te, sizeof(te) - 1);
    } else if (content_length >= 0 && status != 204 && status != 304) {
        static const char cl[] = "Content-Length: ";
        evbuffer_add(o, cl, sizeof(cl) - 1);
        add_uint(o, (uint64_t)content_length);
        evbuffer_add(o, crlf, 2);
    }
    if (!c->keep_alive) {
        static const char cc[] = "Connection: close\r\n";
        evbuffer_add(o, cc, sizeof(cc) - 1);
    } else if (r->http_minor == 0) {
        static const char ka[] = "Connection: keep-alive\r\n";
        evbuffer_add(o, ka, sizeof(ka) - 1);
    }
    evbuffer_add(o, crlf, 2);
}

void
http_reply_data(struct http_req *r, const void *data, size_t len)
{
    struct http_conn *c = req_conn(r);

    if (!c->reply_started || c->reply_ended || c->reply_no_body || len == 0) {
        return;
    }
    if (c->reply_chunked) {
        char hex[20];
        int n = snprintf(hex, sizeof(hex), "%zx\r\n", len);
        evbuffer_add(c->out, hex, (size_t)n);
        evbuffer_add(c->out, data, len);
        evbuffer_add(c->out, "\r\n", 2);
    } else {
        evbuffer_add(c->out, data, len);
    }
    if (conn_flush(c, false) == 0 && evbuffer_get_length(c->out) >= DRAIN_LOW_WATER) {
        c->drain_armed = true;
    }
}

struct ref_release {
    void (*fn)(void *);
    void *arg;
};

static void
ref_cleanup(const void *data, size_t len, void *extra)
{
    struct ref_release *rr = extra;

    (void)data;
    (void)len;
    rr->fn(rr->arg);
    free(rr);
}

void
http_reply_data_ref(struct http_req *r, const void *data, size_t len, void (*release)(void *arg),
                    void *arg)
{
    struct http_conn *c = req_conn(r);
    struct ref_release *rr;

    if (!c->reply_started || c->reply_ended || c->reply_no_body || len == 0 ||
        !(rr = malloc(sizeof(*rr)))) {
        release(arg);
        return;
    }
    rr->fn = release;
    rr->arg = arg;
    if (c->reply_chunked) {
        char hex[20];
        int n = snprintf(hex, sizeof(hex), "%zx\r\n", len);
        evbuffer_add(c->out, hex, (size_t)n);
    }
    if (evbuffer_add_reference(c->out, data, len, ref_cleanup, rr) < 0) {
        free(rr);
        release(arg);
        return;
    }
    if (c->reply_chunked) {
        evbuffer_add(c->out, "\r\n", 2);
    }
    if (conn_flush(c, false) == 0 && evbuffer_get_length(c->out) >= DRAIN_LOW_WATER) {
        c->drain_armed = true;
    }
}

void
http_reply_end(struct http_req *r, bool abort)
{
    struct http_conn *c = req_conn(r);

    if (c->reply_ended) {
        return;
    }
    if (!c->reply_started) {
        http_reply_start(r, 500, NULL, 0, 0);
    }
    c->reply_ended = true;
    c->on_close = NULL;
    c->on_drain = NULL;
    if (abort) {
        c->reply_close = true;
    } else if (c->reply_chunked) {
        evbuffer_add(c->out, "0\r\n\r\n", 5);
    }
    if (!c->keep_alive) {
        c->reply_close = true;
    }
    conn_flush(c, false);
}

void
http_reply(struct http_req *r, int status, const struct http_header *headers, size_t nheaders,
           const void *body, size_t len)
{
    struct http_conn *c = req_conn(r);

    http_reply_start(r, status, headers, nheaders, (int64_t)len);
    if (!c->reply_no_body && len > 0) {
        evbuffer_add(c->out, body, len);
    }
    http_reply_end(r, false);
}

void
http_reply_error_h(struct http_req *r, int status, const char *type, const char *code,
                   const char *message, const struct http_header *headers, size_t nheaders)
{
    struct evbuffer *b = evbuffer_new();
    struct http_header h[16];
    size_t nh = 0;
    bool have_retry = false;

    h[nh++] = (struct http_header){"Content-Type", "application/json"};
    for (size_t i = 0; i < nheaders && nh < 15; i++) {
        have_retry |= strcasecmp(headers[i].name, "Retry-After") == 0;
        h[nh++] = headers[i];
    }
    if ((status == 429 || status == 503) && !have_retry) {
        h[nh++] = (struct http_header){"Retry-After", "1"};
    }
    if (!b) {
        http_reply(r, status, h, nh, "", 0);
        return;
    }
    http_error_fn body = req_conn(r)->srv->error_body;
    if (body) {
        body(r, status, type, code, message, b);
    } else {
        evbuffer_add_printf(b, "{\"error\":{\"message\":\"");
        log_json_escape(b, message);
        evbuffer_add_printf(b, "\",\"type\":\"");
        log_json_escape(b, type);
        evbuffer_add_printf(b, "\",\"code\":\"");
        log_json_escape(b, code);
        evbuffer_add_printf(b, "\"}}\n");
    }
    size_t len = evbuffer_get_length(b);
    http_reply(r, status, h, nh, evbuffer_pullup(b, -1), len);
    evbuffer_free(b);
}

void
http_reply_error(struct http_req *r, int status, const char *type, const char *code,
                 const char *message)
{
    http_reply_error_h(r, status, type, code, message, NULL, 0);
}

bool
http_reply_started(const struct http_req *r)
{
    return req_conn(r)->reply_started;
}

size_t
http_reply_pending(const struct http_req *r)
{
    return evbuffer_get_length(req_conn(r)->out);
}

/* ---- parser check (fuzzing, tests) -------------------------------------- */

int
http_parse_check(const char *buf, size_t len, size_t max_headers, size_t max_body)
{
    struct http_server srv;
    struct http_conn c;
    const char *code, *msg;
    int rc = 1;

    memset(&srv, 0, sizeof(srv));
    memset(&c, 0, sizeof(c));
    srv.lim.max_headers = max_headers;
    srv.lim.max_body = max_body;
    c.srv = &srv;
    c.in = evbuffer_new();
    if (!c.in) {
        return 500;
    }
    req_reset(&c);
    evbuffer_add(c.in, buf, len);

    /* the same steps as conn_process(), minus the socket */
    size_t scan, skip;
    unsigned char *d;
    size_t hlen = head_end(&c, &d, &scan, &skip);
    if (hlen == 0) {
        rc = scan - skip > max_headers ? 431 : 1;
        goto out;
    }
    if (hlen - skip > max_headers) {
        rc = 431;
        goto out;
    }
    c.head = malloc(hlen - skip + 1);
    if (!c.head) {
        rc = 500;
        goto out;
    }
    memcpy(c.head, d + skip, hlen - skip);
    c.head[hlen - skip] = '\0';
    evbuffer_drain(c.in, hlen);
    rc = parse_head(&c, hlen - skip, &code, &msg);
    if (rc != 0) {
        goto out;
    }
    if (c.content_length > 0 || c.chunked) {
        rc = body_begin(&c);
        if (rc != 0) {
            goto out;
        }
        int r = read_body(&c, &msg);
        rc = r < 0 ? -r : r == 1 ? 0 : 1;
    }
out:
    req_reset(&c);
    free(c.hdrs);
    evbuffer_free(c.in);
    return rc;
}

/* ---- listener --------------------------------------------------------- */

static void
accept_resume_cb(evutil_socket_t fd, short what, void *arg)
{
    struct http_server *s = arg;

    (void)fd;
    (void)what;
    if (s->fd >= 0) {
        event_add(s->ev_accept, NULL);
    }
}

static void
refuse_busy(int fd)
{
    static const char busy[] =
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        "Content-Length: 105\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
        "{\"error\":{\"message\":\"too many connections\",\"type\":\"server_busy\","
        "\"code\":\"too_many_connections\"}}\n\n\n";
    ssize_t n = send(fd, busy, sizeof(busy) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)n;
    close(fd);
}

static void
accept_cb(evutil_socket_t lfd, short what, void *arg)
{
    struct http_server *s = arg;

    (void)what;
    for (int i = 0; i < ACCEPT_BURST; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) {
                continue;
            }
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* do not spin on a listener we cannot serve; try again soon */
                log_msg(LOG_WARN, "accept: %s; pausing new connections for %d ms", strerror(errno),
                        ACCEPT_PAUSE_MS);
                event_del(s->ev_accept);
                struct timeval tv = {0, ACCEPT_PAUSE_MS * 1000};
                evtimer_add(s->ev_resume, &tv);
            }
            return;
        }
        if ((int64_t)s->nconns >= s->lim.max_connections) {
            refuse_busy(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        struct http_conn *c = calloc(1, sizeof(*c));
        if (!c) {
            close(fd);
            continue;
        }
        c->srv = s;
        c->fd = fd;
        c->in = evbuffer_new();
        c->out = evbuffer_new();
        c->ev_read = event_new(s->base, fd, EV_READ | EV_PERSIST, conn_read_cb, c);
        c->ev_write = event_new(s->base, fd, EV_WRITE, conn_write_cb, c);
        c->ev_timer = evtimer_new(s->base, conn_timer_cb, c);
        if (!c->in || !c->out || !c->ev_read || !c->ev_write || !c->ev_timer) {
            if (c->in)
                evbuffer_free(c->in);
            if (c->out)
                evbuffer_free(c->out);
            if (c->ev_read)
                event_free(c->ev_read);
            if (c->ev_write)
                event_free(c->ev_write);
            if (c->ev_timer)
                event_free(c->ev_timer);
            free(c);
            close(fd);
            continue;
        }
        c->next = s->conns;
        if (s->conns) {
            s->conns->prev = c;
        }
        s->conns = c;
        s->nconns++;
        req_reset(c);
        c->state = CS_IDLE;
        event_add(c->ev_read, NULL);
        timer_set(c, s->lim.header_timeout_ms);
    }
}

static int
listen_on(const char *addr, char *bound, size_t boundlen)
{
    char host[256];
    const char *colon = strrchr(addr, ':');
    struct addrinfo hints, *res = NULL;
    int fd = -1, one = 1;

    if (!colon || (size_t)(colon - addr) >= sizeof(host)) {
        log_msg(LOG_ERROR, "listen: bad address \"%s\"", addr);
        return -1;
    }
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    if (host[0] == '[') {
        memmove(host, host + 1, strlen(host));
        host[strcspn(host, "]")] = '\0';
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int gai = getaddrinfo(host[0] ? host : NULL, colon + 1, &hints, &res);
    if (gai != 0) {
        log_msg(LOG_ERROR, "listen %s: %s", addr, gai_strerror(gai));
        return -1;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 1024) < 0) {
        log_msg(LOG_ERROR, "listen %s: %s", addr, strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        freeaddrinfo(res);
        return -1;
    }
    freeaddrinfo(res);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char hbuf[NI_MAXHOST], sbuf[NI_MAXSERV];
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
        getnameinfo((struct sockaddr *)&ss, sl, hbuf, sizeof(hbuf), sbuf, sizeof(sbuf),
                    NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
        snprintf(bound, boundlen, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", hbuf, sbuf);
    } else {
        snprintf(bound, boundlen, "%s", addr);
    }
    return fd;
}

struct http_server *
http_server_new(struct event_base *base, const char *addr, const struct http_limits *lim,
                http_handler_fn handler, void *arg)
{
    struct http_server *s = calloc(1, sizeof(*s));

    if (!s) {
        return NULL;
    }
    s->base = base;
    s->lim = *lim;
    s->handler = handler;
    s->arg = arg;
    s->fd = listen_on(addr, s->addr, sizeof(s->addr));
    if (s->fd < 0) {
        free(s);
        return NULL;
    }
    s->ev_accept = event_new(base, s->fd, EV_READ | EV_PERSIST, accept_cb, s);
    s->ev_resume = evtimer_new(base, accept_resume_cb, s);
    if (!s->ev_accept || !s->ev_resume) {
        http_server_free(s);
        return NULL;
    }
    event_add(s->ev_accept, NULL);
    return s;
}

void
http_server_set_limits(struct http_server *s, const struct http_limits *lim)
{
    s->lim = *lim;
}

void
http_server_set_error_body(struct http_server *s, http_error_fn fn)
{
    s->error_body = fn;
}

void
http_server_set_reject_hook(struct http_server *s, http_reject_fn fn, void *arg)
{
    s->on_reject = fn;
    s->reject_arg = arg;
}

void
http_server_stop_accepting(struct http_server *s)
{
    if (s->fd >= 0) {
        event_del(s->ev_accept);
        evtimer_del(s->ev_resume);
        close(s->fd);
        s->fd = -1;
    }
}

void
http_server_close_idle(struct http_server *s)
{
    s->close_idle = true;
    for (struct http_conn *c = s->conns, *next; c; c = next) {
        next = c->next;
        if (c->state == CS_IDLE && evbuffer_get_length(c->in) == 0) {
            conn_free(c);
        }
    }
}

size_t
http_server_nconns(const struct http_server *s)
{
    return s->nconns;
}

const char *
http_server_addr(const struct http_server *s)
{
    return s->addr;
}

void
http_server_free(struct http_server *s)
{
    if (!s) {
        return;
    }
    http_server_stop_accepting(s);
    while (s->conns) {
        conn_lost(s->conns);
    }
    if (s->ev_accept) {
        event_free(s->ev_accept);
    }
    if (s->ev_resume) {
        event_free(s->ev_resume);
    }
    free(s);
}
