/*
 * fake_upstream: a fake DeepSeek (OpenAI-compatible) server for the
 * integration tests and the benchmarks.  tests/fake/README.md is its
 * contract: command line, endpoints, control endpoints and the X-Fake-*
 * headers that make it misbehave on purpose.
 *
 * One libevent loop and a small HTTP/1.1 server of its own (not evhttp), so
 * that it controls every byte: keep-alive and pipelining, Content-Length and
 * chunked request bodies, chunked streams, a half-sent body, a garbage status
 * line, an abrupt RST.  The read event of a connection stays armed at all
 * times, so a client that leaves is noticed at once, even while its request
 * waits or streams.  Only the jansson parser is used; answers are written by
 * hand (no pretty printing, no intermediate JSON objects).
 *
 * Life of a connection (one request active at a time; pipelined requests
 * wait in the input buffer, so answers go out in order):
 *
 *   accept -> IDLE --parse head+body--> dispatch --+-- control: answer, not counted
 *              ^                                   +-- NEVER (until the client leaves)
 *              |                                   +-- HELD (--hold: 200 head, ticks, in the
 *              |                                   |   FIFO) --admitted--> as below, head sent;
 *              |                                   |   --hold-max-ms--> FLUSHING (close)
 *              |                                   +-- DELAY --------------+
 *              |                                   +-- KEEPALIVE (200 head |
 *              |                                   |   sent, ticks) -------+
 *              |                                   v                       v
 *              |                                answer -> STREAM (events, timers)
 *              |                                   |         |
 *              |                                   v         v
 *              +---- finish <-- output drained -- FLUSHING <-+
 *                      |
 *                      +-- keep-alive: next request
 *                      +-- close: shutdown(WR), drain input, close (lingering)
 *                      +-- reset: wait until the kernel sent it all, SO_LINGER 0
 *
 *   EOF or a write error at any point: the active request ends as
 *   "client_closed" (timers cancelled), the connection is closed.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <linux/sockios.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <event2/util.h>
#include <jansson.h>

#define LOG_MAX          1000                   /* /_log ring size */
#define LOG_BODY_MAX     (16L << 20)            /* a body longer than this is logged cut */
#define LOG_BODY_BUDGET  (256L << 20)           /* all logged bodies together */
#define LOG_BODY_SHORT   4096                   /* what is kept of a cut body */
#define MAX_HEAD         (64 * 1024)            /* request line + headers */
#define MAX_HEADERS      256
#define MAX_BODY         (256L << 20)           /* request body */
#define MAX_PENDING      (512L << 20)           /* unread pipelined input */
#define MAX_PAD          (256L << 20)           /* X-Fake-Body-Bytes */
#define MAX_EVENTS       1000000L               /* X-Fake-Events */
#define MAX_MS           (7L * 24 * 3600 * 1000)
#define READ_CHUNK       65536
#define PUMP_MAX         (256 * 1024)           /* stream output queued before waiting */
#define LINGER_MS        2000                   /* lingering close: wait for the client's FIN */
#define RST_WAIT_MS      500                    /* wait for the kernel to send before a RST */
#define DEFAULT_EVENTS   5
#define DEFAULT_KA_MS    1000                   /* keep-alive interval without X-Fake-Keepalive-Ms */

/* ------------------------------------------------------------ buffers */

struct buf {
    char *p;
    size_t len, cap;
};

struct span {
    const char *p;
    size_t n;
};

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL) {
        fprintf(stderr, "fake_upstream: out of memory (%zu bytes)\n", n);
        abort();
    }
    return q;
}

static void buf_grow(struct buf *b, size_t extra)
{
    if (b->cap - b->len >= extra) {
        return;
    }
    size_t cap = b->cap ? b->cap : 512;
    while (cap - b->len < extra) {
        cap *= 2;
    }
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static inline void buf_add(struct buf *b, const void *s, size_t n)
{
    buf_grow(b, n);
    if (n) {
        memcpy(b->p + b->len, s, n);
    }
    b->len += n;
}

/* S must be a string literal (the "" "" makes anything else a compile error). */
#define buf_lit(b, s) buf_add((b), "" s "", sizeof(s) - 1)

static void buf_str(struct buf *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

static void buf_u64(struct buf *b, uint64_t v)
{
    char t[24];
    int i = sizeof t;
    do {
        t[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    buf_add(b, t + i, sizeof t - i);
}

static void buf_i64(struct buf *b, int64_t v)
{
    if (v < 0) {
        buf_lit(b, "-");
        buf_u64(b, (uint64_t)0 - (uint64_t)v);
    } else {
        buf_u64(b, (uint64_t)v);
    }
}

static void buf_hex(struct buf *b, size_t v)
{
    static const char hex[] = "0123456789abcdef";
    char t[20];
    int i = sizeof t;
    do {
        t[--i] = hex[v & 15];
        v >>= 4;
    } while (v);
    buf_add(b, t + i, sizeof t - i);
}

__attribute__((format(printf, 2, 3)))
static void buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0) {
        return;
    }
    buf_grow(b, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static void buf_free(struct buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* Gives a large buffer back once it is no longer needed. */
static void buf_trim(struct buf *b)
{
    if (b->cap > (1u << 20)) {
        buf_free(b);
    }
}

/* ------------------------------------------------------------ text and JSON */

/* Length of the valid UTF-8 sequence at S (N bytes left), 0 if invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    if (c < 0x80) {
        return 1;
    }
    if (c >= 0xc2 && c <= 0xdf) {
        return n >= 2 && (s[1] & 0xc0) == 0x80 ? 2 : 0;
    }
    if (c >= 0xe0 && c <= 0xef) {
        if (n < 3 || (s[1] & 0xc0) != 0x80 || (s[2] & 0xc0) != 0x80 ||
            (c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] >= 0xa0)) {
            return 0;
        }
        return 3;
    }
    if (c >= 0xf0 && c <= 0xf4) {
        if (n < 4 || (s[1] & 0xc0) != 0x80 || (s[2] & 0xc0) != 0x80 ||
            (s[3] & 0xc0) != 0x80 || (c == 0xf0 && s[1] < 0x90) ||
            (c == 0xf4 && s[1] >= 0x90)) {
            return 0;
        }
        return 4;
    }
    return 0;
}

/* Appends S as a JSON string; invalid UTF-8 bytes become U+FFFD. */
static void js_str(struct buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, run = 0;

    buf_grow(b, n + 2);
    buf_lit(b, "\"");
    while (i < n) {
        unsigned char ch = p[i];
        if (ch >= 0x20 && ch < 0x80 && ch != '"' && ch != '\\') {
            i++;
            continue;
        }
        buf_add(b, s + run, i - run);
        if (ch >= 0x80) {
            size_t k = utf8_len(p + i, n - i);
            if (k) {
                buf_add(b, s + i, k);
                i += k;
            } else {
                buf_lit(b, "\\ufffd");
                i++;
            }
        } else {
            switch (ch) {
            case '"': buf_lit(b, "\\\""); break;
            case '\\': buf_lit(b, "\\\\"); break;
            case '\n': buf_lit(b, "\\n"); break;
            case '\r': buf_lit(b, "\\r"); break;
            case '\t': buf_lit(b, "\\t"); break;
            default: {
                char e[6] = { '\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15] };
                buf_add(b, e, sizeof e);
            }
            }
            i++;
        }
        run = i;
    }
    buf_add(b, s + run, n - run);
    buf_lit(b, "\"");
}

static void js_cstr(struct buf *b, const char *s)
{
    js_str(b, s, strlen(s));
}

static size_t utf8_count(const char *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        k += ((unsigned char)s[i] & 0xc0) != 0x80;
    }
    return k;
}

/*
 * Byte offsets that cut S (NCP code points, NCP >= N) into N pieces of
 * roughly equal numbers of code points: piece i is [out[i], out[i + 1]).
 * No piece is empty and no code point is cut.
 */
static void split_bounds(const char *s, size_t len, size_t ncp, size_t n, size_t *out)
{
    size_t cp = 0, i = 1;
    out[0] = 0;
    for (size_t b = 0; b < len && i < n; b++) {
        if (((unsigned char)s[b] & 0xc0) == 0x80) {
            continue;
        }
        while (i < n && cp == (size_t)((uint64_t)i * ncp / n)) {
            out[i++] = b;
        }
        cp++;
    }
    while (i <= n) {
        out[i++] = len;
    }
}

/* Appends filler words until B holds exactly N bytes (ASCII). */
static void pad_to(struct buf *b, size_t n)
{
    static const char filler[] =
        " lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod"
        " tempor incididunt ut labore et dolore magna aliqua";
    size_t pos = 0;
    buf_grow(b, n > b->len ? n - b->len : 0);
    while (b->len < n) {
        size_t k = sizeof filler - 1 - pos;
        if (k > n - b->len) {
            k = n - b->len;
        }
        buf_add(b, filler + pos, k);
        pos = (pos + k) % (sizeof filler - 1);
    }
}

static bool span_ieq(struct span s, const char *lit)
{
    size_t n = strlen(lit);
    return s.n == n && strncasecmp(s.p, lit, n) == 0;
}

static bool span_eq(struct span s, const char *lit)
{
    size_t n = strlen(lit);
    return s.n == n && memcmp(s.p, lit, n) == 0;
}

/* Case-insensitive: does the comma-separated list S hold TOKEN? */
static bool span_has_token(struct span s, const char *token)
{
    size_t tn = strlen(token), i = 0;
    while (i < s.n) {
        while (i < s.n && (s.p[i] == ' ' || s.p[i] == '\t' || s.p[i] == ',')) {
            i++;
        }
        size_t j = i;
        while (j < s.n && s.p[j] != ',') {
            j++;
        }
        size_t e = j;
        while (e > i && (s.p[e - 1] == ' ' || s.p[e - 1] == '\t')) {
            e--;
        }
        if (e - i == tn && strncasecmp(s.p + i, token, tn) == 0) {
            return true;
        }
        i = j;
    }
    return false;
}

/* Decimal digits only, clamped to MAX.  False when not a number. */
static bool span_num(struct span s, long max, long *out)
{
    if (s.n == 0 || s.n > 18) {
        return false;
    }
    long v = 0;
    for (size_t i = 0; i < s.n; i++) {
        if (s.p[i] < '0' || s.p[i] > '9') {
            return false;
        }
        v = v * 10 + (s.p[i] - '0');
    }
    *out = v > max ? max : v;
    return true;
}

static bool span_true(struct span s)
{
    return span_ieq(s, "1") || span_ieq(s, "true") || span_ieq(s, "yes") || span_ieq(s, "on");
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------ HTTP heads */

static bool is_tchar(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) {
        return true;
    }
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* Next line of a head (without its CR LF); false at the end. */
static bool head_line(const char **pp, const char *end, struct span *line)
{
    const char *p = *pp;
    if (p >= end) {
        return false;
    }
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    if (nl == NULL) {
        nl = end;
    }
    size_t n = (size_t)(nl - p);
    if (n && p[n - 1] == '\r') {
        n--;
    }
    line->p = p;
    line->n = n;
    *pp = nl < end ? nl + 1 : end;
    return true;
}

/* "METHOD /path?query HTTP/1.x": 0, or -1 when malformed. */
static int reqline_split(struct span l, struct span *method, struct span *path,
                         struct span *query, int *minor)
{
    const char *sp1 = memchr(l.p, ' ', l.n);
    if (sp1 == NULL || sp1 == l.p) {
        return -1;
    }
    const char *rest = sp1 + 1, *end = l.p + l.n;
    const char *sp2 = memchr(rest, ' ', (size_t)(end - rest));
    if (sp2 == NULL || sp2 == rest) {
        return -1;
    }
    struct span version = { sp2 + 1, (size_t)(end - sp2 - 1) };
    method->p = l.p;
    method->n = (size_t)(sp1 - l.p);
    for (size_t i = 0; i < method->n; i++) {
        if (!is_tchar((unsigned char)method->p[i])) {
            return -1;
        }
    }
    if (rest[0] != '/') {
        return -1;
    }
    for (const char *q = rest; q < sp2; q++) {
        if ((unsigned char)*q <= 0x20 || *q == 0x7f) {
            return -1;
        }
    }
    const char *qm = memchr(rest, '?', (size_t)(sp2 - rest));
    path->p = rest;
    path->n = (size_t)((qm ? qm : sp2) - rest);
    query->p = qm ? qm + 1 : sp2;
    query->n = qm ? (size_t)(sp2 - qm - 1) : 0;
    if (span_eq(version, "HTTP/1.1")) {
        *minor = 1;
    } else if (span_eq(version, "HTTP/1.0")) {
        *minor = 0;
    } else {
        return -1;
    }
    return 0;
}

/* "Name: value" with the value trimmed: 0, or -1 when malformed. */
static int hdr_split(struct span l, struct span *name, struct span *value)
{
    if (l.n == 0 || l.p[0] == ' ' || l.p[0] == '\t') {
        return -1;                              /* obsolete line folding */
    }
    const char *colon = memchr(l.p, ':', l.n);
    if (colon == NULL || colon == l.p) {
        return -1;
    }
    name->p = l.p;
    name->n = (size_t)(colon - l.p);
    for (size_t i = 0; i < name->n; i++) {
        if (!is_tchar((unsigned char)name->p[i])) {
            return -1;
        }
    }
    const char *v = colon + 1, *e = l.p + l.n;
    while (v < e && (*v == ' ' || *v == '\t')) {
        v++;
    }
    while (e > v && (e[-1] == ' ' || e[-1] == '\t')) {
        e--;
    }
    for (const char *q = v; q < e; q++) {
        if ((*q == 0 || *q == '\r' || *q == '\n')) {
            return -1;
        }
    }
    value->p = v;
    value->n = (size_t)(e - v);
    return 0;
}

/*
 * Appends the members "method","path","query","headers","body" of a request
 * (raw head HEAD, body BODY) to B, without braces.  Header names are lower
 * case; repeated headers are joined with ", ".
 */
static void js_request(struct buf *b, struct span head, struct span body)
{
    const char *p = head.p, *end = head.p + head.n;
    struct span l, m = { "", 0 }, path = { "", 0 }, q = { "", 0 };
    struct span names[MAX_HEADERS], vals[MAX_HEADERS];
    int minor, nh = 0;

    if (head_line(&p, end, &l)) {
        reqline_split(l, &m, &path, &q, &minor);
    }
    while (head_line(&p, end, &l) && l.n > 0 && nh < MAX_HEADERS) {
        if (hdr_split(l, &names[nh], &vals[nh]) == 0) {
            nh++;
        }
    }
    buf_lit(b, "\"method\":");
    js_str(b, m.p, m.n);
    buf_lit(b, ",\"path\":");
    js_str(b, path.p, path.n);
    buf_lit(b, ",\"query\":");
    js_str(b, q.p, q.n);
    buf_lit(b, ",\"headers\":{");
    bool first = true;
    for (int i = 0; i < nh; i++) {
        bool seen = false;
        for (int j = 0; j < i && !seen; j++) {
            seen = names[j].n == names[i].n && strncasecmp(names[j].p, names[i].p, names[i].n) == 0;
        }
        if (seen) {
            continue;
        }
        char lname[256];
        size_t ln = names[i].n < sizeof lname ? names[i].n : sizeof lname;
        for (size_t k = 0; k < ln; k++) {
            lname[k] = (char)((names[i].p[k] >= 'A' && names[i].p[k] <= 'Z') ? names[i].p[k] + 32
                                                                              : names[i].p[k]);
        }
        if (!first) {
            buf_lit(b, ",");
        }
        first = false;
        js_str(b, lname, ln);
        buf_lit(b, ":");
        struct buf v = { 0 };
        buf_add(&v, vals[i].p, vals[i].n);
        for (int j = i + 1; j < nh; j++) {
            if (names[j].n == names[i].n && strncasecmp(names[j].p, names[i].p, names[i].n) == 0) {
                buf_lit(&v, ", ");
                buf_add(&v, vals[j].p, vals[j].n);
            }
        }
        js_str(b, v.p ? v.p : "", v.len);
        buf_free(&v);
    }
    buf_lit(b, "},\"body\":");
    js_str(b, body.p ? body.p : "", body.n);
}

/* ------------------------------------------------------------ state */

struct opts {
    const char *host;
    int port;
    long capacity;                  /* 0: unlimited */
    double fail_rate;
    long latency_ms;
    uint64_t seed;
    const char *name;               /* NULL: none */
    int status;                     /* 0: normal */
    const char *retry_after;        /* NULL: none */
    bool quiet;
    bool hold;                      /* over capacity: hold (200, keep-alives), not 503 */
    long hold_ka_ms, hold_max_ms;
    long account_limit;             /* 0: none; beyond: 429 */
    long fail_next;                 /* the next N completion requests fail ... */
    long fail_status;               /* ... with this status (default 503) */
    bool anthropic_done;            /* Anthropic streams end with data: [DONE] too */
};

struct logent {
    uint64_t seq;                   /* 0: free slot */
    char *mem;                      /* raw head, then the (maybe cut) body */
    size_t cap, head_len, body_len, body_total;
    int64_t t_start, t_end, t_closed;   /* -1: not yet / never */
    int status;                     /* 0: no HTTP answer (never, garbage, reset) */
    bool client_closed;
    int64_t held_ms;                /* -1: not held (or still held) */
};

struct stats {
    uint64_t requests, completed, client_closed, conns_total, held_total, hold_closed;
    long inflight, max_inflight, held;
};

struct conn;

struct fake {
    struct event_base *base;
    struct opts opt;
    struct stats st;
    unsigned gen;                   /* bumped by /_reset */
    uint64_t seq;                   /* call number, never reset */
    long cinflight;                 /* completion requests in flight (for --capacity) */
    long cheld;                     /* of them, held (--hold): not in the capacity */
    struct conn *hold_head, *hold_tail; /* the held requests, oldest first */
    struct event *admitter;         /* admits held requests once there is room */
    uint64_t rng;
    struct logent log[LOG_MAX];
    unsigned log_next, log_count;
    size_t log_body_bytes;
    struct conn *conns;             /* live connections */
    long nconns;
    struct conn *dead;              /* closed, freed by the reaper */
    struct event *reaper;
    struct event *flusher;
    struct evconnlistener *listener;
    struct event *relisten;
    struct buf scratch;             /* answer bodies, /_log, ... */
    struct buf hbuf;                /* response heads */
};

enum ep {
    EP_ECHO, EP_CHAT, EP_COMPL, EP_EMBED, EP_MODELS, EP_ANTH, EP_ANTH_COUNT,
    EP_STATS, EP_RESET, EP_LOG, EP_CONFIG,      /* control: not counted */
};

enum pstate { PS_HEAD, PS_BODY, PS_CHUNK_SIZE, PS_CHUNK_DATA, PS_CHUNK_CRLF, PS_TRAILER, PS_DONE };

enum rstate { RS_IDLE, RS_NEVER, RS_HELD, RS_DELAY, RS_KEEPALIVE, RS_STREAM, RS_FLUSHING };

enum after { AFTER_KEEP, AFTER_CLOSE, AFTER_RST };

enum closing { CL_NONE, CL_LINGER, CL_RST };

enum tkind { TK_TICK, TK_EVENT, TK_LINGER, TK_RST };

enum flush { FL_DRAINED, FL_PENDING, FL_GONE };

struct req {
    /* parsed; spans point into conn->head */
    struct span method, path, query;
    int minor;
    bool keepalive, head_method, chunked, expect100;
    int64_t clen;                   /* -1: none */
    /* X-Fake-* */
    long x_status, x_delay, x_ka, x_events, x_ev_delay, x_reset, x_body_bytes;
    long x_first, x_hold_close;     /* -1: absent */
    int x_anth_done;                /* X-Fake-Anthropic-Done: -1 absent, 0, 1 */
    bool x_trunc, x_never, x_garbage, x_reset_reused;
    struct span x_retry, x_redirect;
    /* running */
    enum ep ep;
    bool counted, completion, stream, reasoner, bad_json, head_sent, wait_timer;
    bool anth;                      /* an Anthropic path: Anthropic-shaped errors */
    bool tool;                      /* the answer is a tool call (content: its arguments) */
    bool anth_done;                 /* this Anthropic stream ends with data: [DONE] */
    enum after after;
    unsigned gen;
    uint64_t seq;
    unsigned log_slot;
    int64_t t_start, deadline, next_ka, delay;
    long ka_every;                  /* keep-alive interval in RS_KEEPALIVE, 0: none */
    bool ka_close;                  /* RS_KEEPALIVE ends in a close, not an answer */
    bool held, was_held;            /* in the hold FIFO now / was */
    bool acct;                      /* 429 by --account-limit */
    int64_t t_held, last_ka;
    time_t created;
    int status, sent_status;
    /* generated answer */
    size_t nev, ev_total, ev_next, data_sent;
    uint64_t ptok, ctok, rtok, nembed;
};

struct conn {
    struct fake *f;
    struct conn *prev, *next, *next_dead;
    struct conn *hold_prev, *hold_next;   /* the hold FIFO */
    int fd;
    bool dead, shut, wev_on;
    enum closing closing;
    int64_t t_rst;
    unsigned long nreq;             /* requests dispatched on this connection */
    struct event *rev, *wev, *tev;
    enum tkind tk;
    struct evbuffer *in, *out;
    /* parser */
    enum pstate ps;
    size_t scan;
    int64_t left;
    /* the active request */
    enum rstate rs;
    struct req r;
    struct buf head, body;          /* raw head, decoded body */
    struct buf model;               /* JSON string, quoted */
    struct buf content, reasoning, prefix, errmsg;
    struct buf tool_name;           /* JSON string, quoted (r.tool) */
    size_t *bounds;                 /* nev + 1 content cuts */
    size_t bounds_cap;
    size_t rbounds[3];              /* reasoning cuts */
};

static void conn_step(struct conn *c);
static void conn_close(struct conn *c, bool rst);
static void hold_leave(struct conn *c, int64_t now);

/* ------------------------------------------------------------ misc */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double rng_unit(struct fake *f)
{
    return (double)(splitmix64(&f->rng) >> 11) * 0x1.0p-53;
}

struct status_info {
    int status;
    const char *reason, *message, *type;
};

static const struct status_info statuses[] = {
    { 200, "OK", NULL, NULL },
    { 201, "Created", NULL, NULL },
    { 202, "Accepted", NULL, NULL },
    { 204, "No Content", NULL, NULL },
    { 301, "Moved Permanently", "Moved", "redirect" },
    { 302, "Found", "Found", "redirect" },
    { 304, "Not Modified", NULL, NULL },
    { 307, "Temporary Redirect", "Moved", "redirect" },
    { 400, "Bad Request", "Invalid request (fake)", "invalid_request_error" },
    { 401, "Unauthorized", "Authentication Fails, Your api key is invalid (fake)", "authentication_error" },
    { 402, "Payment Required", "Insufficient Balance (fake)", "insufficient_balance_error" },
    { 403, "Forbidden", "Permission denied (fake)", "permission_error" },
    { 404, "Not Found", "Not found (fake)", "not_found_error" },
    { 405, "Method Not Allowed", "Method not allowed (fake)", "invalid_request_error" },
    { 408, "Request Timeout", "Request timeout (fake)", "timeout_error" },
    { 409, "Conflict", "Conflict (fake)", "invalid_request_error" },
    { 413, "Payload Too Large", "Request body too large (fake)", "invalid_request_error" },
    { 422, "Unprocessable Entity", "Invalid Parameters (fake)", "invalid_request_error" },
    { 429, "Too Many Requests", "Rate limit reached for requests (fake)", "rate_limit_error" },
    { 431, "Request Header Fields Too Large", "Request headers too large (fake)", "invalid_request_error" },
    { 500, "Internal Server Error", "Server error (fake)", "server_error" },
    { 501, "Not Implemented", "Not implemented (fake)", "invalid_request_error" },
    { 502, "Bad Gateway", "Bad gateway (fake)", "server_error" },
    { 503, "Service Unavailable", "Server is busy", "server_busy" },
    { 504, "Gateway Timeout", "Gateway timeout (fake)", "server_error" },
    { 529, "Overloaded", "Overloaded", "overloaded_error" },
};

static struct status_info status_lookup(int status)
{
    for (size_t i = 0; i < sizeof statuses / sizeof statuses[0]; i++) {
        if (statuses[i].status == status) {
            return statuses[i];
        }
    }
    struct status_info si = { status, "Fake Status", "Fake error", "fake_error" };
    return si;
}

/* 2xx other than 204 carry the normal answer. */
static bool status_normal(int status)
{
    return status >= 200 && status <= 299 && status != 204;
}

static bool status_no_body(int status)
{
    return status == 204 || status == 304;
}

/* ------------------------------------------------------------ /_log */

/* Records the active request of C in the ring; C->r.log_slot says where. */
static void log_add(struct fake *f, struct conn *c)
{
    unsigned slot = f->log_next;
    struct logent *e = &f->log[slot];
    f->log_next = (slot + 1) % LOG_MAX;
    if (f->log_count < LOG_MAX) {
        f->log_count++;
    }
    if (e->seq) {
        f->log_body_bytes -= e->body_len;
    }
    size_t blen = c->body.len;
    if (blen > (size_t)LOG_BODY_MAX || f->log_body_bytes + blen > (size_t)LOG_BODY_BUDGET) {
        blen = blen < LOG_BODY_SHORT ? blen : LOG_BODY_SHORT;
    }
    size_t need = c->head.len + blen;
    if (e->cap < need || (e->cap > 65536 && need < e->cap / 4)) {
        e->mem = xrealloc(e->mem, need);
        e->cap = need;
    }
    memcpy(e->mem, c->head.p, c->head.len);
    if (blen) {
        memcpy(e->mem + c->head.len, c->body.p, blen);
    }
    e->seq = c->r.seq;
    e->head_len = c->head.len;
    e->body_len = blen;
    e->body_total = c->body.len;
    e->t_start = c->r.t_start;
    e->t_end = e->t_closed = -1;
    e->status = 0;
    e->client_closed = false;
    e->held_ms = -1;
    f->log_body_bytes += blen;
    c->r.log_slot = slot;
}

static struct logent *log_find(struct fake *f, const struct req *r)
{
    struct logent *e = &f->log[r->log_slot];
    return e->seq == r->seq ? e : NULL;
}

static void log_clear(struct fake *f)
{
    for (unsigned i = 0; i < LOG_MAX; i++) {
        free(f->log[i].mem);
        memset(&f->log[i], 0, sizeof f->log[i]);
    }
    f->log_next = f->log_count = 0;
    f->log_body_bytes = 0;
}

static void js_ms(struct buf *b, int64_t ms)
{
    if (ms < 0) {
        buf_lit(b, "null");
    } else {
        buf_i64(b, ms);
    }
}

static void log_json(struct fake *f, struct buf *b)
{
    unsigned start = (f->log_next + LOG_MAX - f->log_count) % LOG_MAX;
    buf_lit(b, "[");
    for (unsigned k = 0; k < f->log_count; k++) {
        const struct logent *e = &f->log[(start + k) % LOG_MAX];
        if (k) {
            buf_lit(b, ",");
        }
        buf_lit(b, "{\"seq\":");
        buf_u64(b, e->seq);
        buf_lit(b, ",");
        struct span head = { e->mem, e->head_len }, body = { e->mem + e->head_len, e->body_len };
        js_request(b, head, body);
        buf_lit(b, ",\"body_bytes\":");
        buf_u64(b, e->body_total);
        if (e->body_len < e->body_total) {
            buf_lit(b, ",\"body_truncated\":true");
        }
        buf_lit(b, ",\"status\":");
        if (e->status) {
            buf_i64(b, e->status);
        } else {
            buf_lit(b, "null");
        }
        buf_lit(b, ",\"t_start_ms\":");
        js_ms(b, e->t_start);
        buf_lit(b, ",\"t_end_ms\":");
        js_ms(b, e->t_end);
        if (e->client_closed) {
            buf_lit(b, ",\"client_closed\":true");
        } else {
            buf_lit(b, ",\"client_closed\":false");
        }
        buf_lit(b, ",\"t_closed_ms\":");
        js_ms(b, e->t_closed);
        buf_lit(b, ",\"held_ms\":");
        js_ms(b, e->held_ms);
        buf_lit(b, "}");
    }
    buf_lit(b, "]");
}

static void stats_json(struct fake *f, struct buf *b)
{
    buf_lit(b, "{\"name\":");
    js_cstr(b, f->opt.name ? f->opt.name : "");
    buf_lit(b, ",\"requests\":");
    buf_u64(b, f->st.requests);
    buf_lit(b, ",\"inflight\":");
    buf_i64(b, f->st.inflight);
    buf_lit(b, ",\"max_inflight\":");
    buf_i64(b, f->st.max_inflight);
    buf_lit(b, ",\"client_closed\":");
    buf_u64(b, f->st.client_closed);
    buf_lit(b, ",\"completed\":");
    buf_u64(b, f->st.completed);
    buf_lit(b, ",\"connections\":");
    buf_i64(b, f->nconns);
    buf_lit(b, ",\"connections_total\":");
    buf_u64(b, f->st.conns_total);
    buf_lit(b, ",\"seq\":");
    buf_u64(b, f->seq);
    buf_lit(b, ",\"held\":");
    buf_i64(b, f->st.held);
    buf_lit(b, ",\"held_total\":");
    buf_u64(b, f->st.held_total);
    buf_lit(b, ",\"hold_closed\":");
    buf_u64(b, f->st.hold_closed);
    buf_lit(b, "}");
}

/* Zeroes the counters and the log.  Requests still running keep running but
 * no longer count (their generation is older). */
static void fake_reset(struct fake *f)
{
    f->gen++;
    memset(&f->st, 0, sizeof f->st);
    log_clear(f);
}

/* ------------------------------------------------------------ output */

/* Writes what C has queued: FL_DRAINED, FL_PENDING (write event armed) or
 * FL_GONE (the client left; C is closed). */
static enum flush conn_flush(struct conn *c);

static void conn_gone(struct conn *c);

static void conn_timer(struct conn *c, enum tkind kind, int64_t ms)
{
    if (ms < 0) {
        ms = 0;
    }
    struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000) };
    c->tk = kind;
    event_base_update_cache_time(c->f->base);   /* count from now, not from the loop's start */
    evtimer_add(c->tev, &tv);
}

/* One piece of a body sent without Content-Length: a chunk, or raw bytes
 * for an HTTP/1.0 client (the close ends the body). */
static void out_chunk(struct conn *c, const char *p, size_t n)
{
    if (n == 0) {
        return;
    }
    if (c->r.minor == 1) {
        struct buf *h = &c->f->hbuf;
        h->len = 0;
        buf_hex(h, n);
        buf_lit(h, "\r\n");
        evbuffer_add(c->out, h->p, h->len);
        evbuffer_add(c->out, p, n);
        evbuffer_add(c->out, "\r\n", 2);
    } else {
        evbuffer_add(c->out, p, n);
    }
}

static void out_end(struct conn *c)
{
    if (c->r.minor == 1) {
        evbuffer_add(c->out, "0\r\n\r\n", 5);
    } else {
        c->r.after = AFTER_CLOSE;
    }
}

/*
 * Queues a response head.  CLEN < 0: the body is chunked (HTTP/1.1) or ends
 * with the connection (HTTP/1.0).  EXTRA: more header lines, each ending in
 * CR LF (may be NULL).
 */
static void http_head(struct conn *c, int status, const char *ctype, int64_t clen, const char *extra)
{
    struct fake *f = c->f;
    struct req *r = &c->r;
    struct buf *h = &f->hbuf;
    struct status_info si = status_lookup(status);

    if (clen < 0 && r->minor == 0) {
        r->after = AFTER_CLOSE;
    }
    h->len = 0;
    buf_lit(h, "HTTP/1.1 ");
    buf_u64(h, (uint64_t)status);
    buf_lit(h, " ");
    buf_str(h, si.reason);
    buf_lit(h, "\r\n");
    if (ctype) {
        buf_lit(h, "Content-Type: ");
        buf_str(h, ctype);
        buf_lit(h, "\r\n");
    }
    if (clen >= 0) {
        if (status != 204 && status != 304) {
            buf_lit(h, "Content-Length: ");
            buf_u64(h, (uint64_t)clen);
            buf_lit(h, "\r\n");
        }
    } else if (r->minor == 1) {
        buf_lit(h, "Transfer-Encoding: chunked\r\n");
    }
    if (r->counted) {
        buf_lit(h, "X-Fake-Seq: ");
        buf_u64(h, r->seq);
        buf_lit(h, "\r\n");
    }
    if (f->opt.name) {
        buf_lit(h, "X-Fake-Name: ");
        buf_str(h, f->opt.name);
        buf_lit(h, "\r\n");
    }
    if (status == 429 || status == 503 || status == 529) {
        if (r->x_retry.n) {
            buf_lit(h, "Retry-After: ");
            buf_add(h, r->x_retry.p, r->x_retry.n);
            buf_lit(h, "\r\n");
        } else if (f->opt.retry_after) {
            buf_lit(h, "Retry-After: ");
            buf_str(h, f->opt.retry_after);
            buf_lit(h, "\r\n");
        } else if (r->acct) {
            buf_lit(h, "Retry-After: 1\r\n");
        }
    }
    if (extra) {
        buf_str(h, extra);
    }
    if (r->after == AFTER_CLOSE && !r->x_trunc) {
        buf_lit(h, "Connection: close\r\n");
    } else if (r->minor == 0 && r->after == AFTER_KEEP) {
        buf_lit(h, "Connection: keep-alive\r\n");
    }
    buf_lit(h, "\r\n");
    evbuffer_add(c->out, h->p, h->len);
    r->sent_status = status;
}

static void free_cb(const void *data, size_t len, void *arg)
{
    (void)len;
    (void)arg;
    free((void *)data);
}

/* Queues the whole body in B (taking over large buffers instead of copying). */
static void out_body(struct conn *c, struct buf *b, size_t n)
{
    if (n >= 65536 && evbuffer_add_reference(c->out, b->p, n, free_cb, NULL) == 0) {
        b->p = NULL;
        b->len = b->cap = 0;
        return;
    }
    evbuffer_add(c->out, b->p, n);
}

/* Answers with body B (all of it, or half with X-Fake-Truncate) and moves to
 * FLUSHING.  After a keep-alive head the body goes out as a chunk. */
static void answer_body(struct conn *c, int status, const char *ctype, struct buf *b, const char *extra)
{
    struct req *r = &c->r;
    size_t n = r->x_trunc ? b->len / 2 : b->len;

    if (r->head_sent) {
        out_chunk(c, b->p, n);
        if (r->x_trunc) {
            r->after = AFTER_CLOSE;
        } else {
            out_end(c);
        }
    } else {
        if (r->x_trunc) {
            r->after = AFTER_CLOSE;
        }
        http_head(c, status, status_no_body(status) ? NULL : ctype,
                  status_no_body(status) ? 0 : (int64_t)b->len, extra);
        if (!r->head_method && !status_no_body(status)) {
            out_body(c, b, n);
        }
    }
    c->rs = RS_FLUSHING;
}

/* ------------------------------------------------------------ answers */

static const char models_json[] =
    "{\"object\":\"list\",\"data\":["
    "{\"id\":\"deepseek-chat\",\"object\":\"model\",\"owned_by\":\"deepseek\"},"
    "{\"id\":\"deepseek-reasoner\",\"object\":\"model\",\"owned_by\":\"deepseek\"},"
    "{\"id\":\"deepseek-v4-flash\",\"object\":\"model\",\"owned_by\":\"deepseek\"},"
    "{\"id\":\"deepseek-v4-pro\",\"object\":\"model\",\"owned_by\":\"deepseek\"}]}";

/* The error "type" of the Anthropic Messages API for STATUS. */
static const char *anth_error_type(int status)
{
    switch (status) {
    case 400: return "invalid_request_error";
    case 401: return "authentication_error";
    case 402: return "billing_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 413: return "request_too_large";
    case 429: return "rate_limit_error";
    case 503: case 529: return "overloaded_error";
    case 504: return "timeout_error";
    default: return status >= 500 ? "api_error" : "invalid_request_error";
    }
}

/* The error answer of an Anthropic path:
 * {"type":"error","error":{"type":..,"message":..}}. */
static void anth_error_json(struct conn *c, struct buf *b)
{
    struct status_info si = status_lookup(c->r.status);
    buf_lit(b, "{\"type\":\"error\",\"error\":{\"type\":");
    js_cstr(b, c->r.bad_json ? "invalid_request_error" : anth_error_type(c->r.status));
    buf_lit(b, ",\"message\":");
    if (c->r.bad_json) {
        js_str(b, c->errmsg.p, c->errmsg.len);
    } else {
        js_cstr(b, c->r.acct ? "Too many concurrent requests" : si.message);
    }
    buf_lit(b, "}}");
}

static void error_json(struct conn *c, struct buf *b)
{
    struct status_info si = status_lookup(c->r.status);
    if (c->r.anth) {
        anth_error_json(c, b);
        return;
    }
    buf_lit(b, "{\"error\":{\"message\":");
    if (c->r.bad_json) {
        js_str(b, c->errmsg.p, c->errmsg.len);
        buf_lit(b, ",\"type\":\"invalid_request_error\",\"param\":null,"
                   "\"code\":\"invalid_request_error\"}}");
        return;
    }
    js_cstr(b, c->r.acct ? "Too many concurrent requests" : si.message);
    buf_lit(b, ",\"type\":");
    js_cstr(b, si.type);
    buf_lit(b, ",\"param\":null,\"code\":");
    js_cstr(b, si.type);
    buf_lit(b, "}}");
}

static void usage_json(struct conn *c, struct buf *b)
{
    struct req *r = &c->r;
    uint64_t comp = r->ctok + r->rtok;
    buf_lit(b, "{\"prompt_tokens\":");
    buf_u64(b, r->ptok);
    buf_lit(b, ",\"completion_tokens\":");
    buf_u64(b, comp);
    buf_lit(b, ",\"total_tokens\":");
    buf_u64(b, r->ptok + comp);
    buf_lit(b, ",\"prompt_tokens_details\":{\"cached_tokens\":0}");
    if (r->reasoner) {
        buf_lit(b, ",\"completion_tokens_details\":{\"reasoning_tokens\":");
        buf_u64(b, r->rtok);
        buf_lit(b, "}");
    }
    buf_lit(b, ",\"prompt_cache_hit_tokens\":0,\"prompt_cache_miss_tokens\":");
    buf_u64(b, r->ptok);
    buf_lit(b, "}");
}

static void chat_json(struct conn *c, struct buf *b)
{
    struct req *r = &c->r;
    buf_lit(b, "{\"id\":\"chatcmpl-");
    buf_u64(b, r->seq);
    buf_lit(b, "\",\"object\":\"chat.completion\",\"created\":");
    buf_i64(b, (int64_t)r->created);
    buf_lit(b, ",\"model\":");
    buf_add(b, c->model.p, c->model.len);
    buf_lit(b, ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
    if (r->tool) {
        buf_lit(b, "\"\"");
    } else {
        js_str(b, c->content.p, c->content.len);
    }
    if (r->reasoner) {
        buf_lit(b, ",\"reasoning_content\":");
        js_str(b, c->reasoning.p, c->reasoning.len);
    }
    if (r->tool) {
        buf_lit(b, ",\"tool_calls\":[{\"id\":\"call_");
        buf_u64(b, r->seq);
        buf_lit(b, "\",\"type\":\"function\",\"function\":{\"name\":");
        buf_add(b, c->tool_name.p, c->tool_name.len);
        buf_lit(b, ",\"arguments\":");
        js_str(b, c->content.p, c->content.len);
        buf_lit(b, "}}]");
    }
    buf_lit(b, "},\"logprobs\":null,\"finish_reason\":");
    if (r->tool) {
        buf_lit(b, "\"tool_calls\"}],\"usage\":");
    } else {
        buf_lit(b, "\"stop\"}],\"usage\":");
    }
    usage_json(c, b);
    buf_lit(b, ",\"system_fingerprint\":\"fp_fake\"}");
}

static void anth_usage_json(struct conn *c, struct buf *b)
{
    buf_lit(b, "{\"input_tokens\":");
    buf_u64(b, c->r.ptok);
    buf_lit(b, ",\"output_tokens\":");
    buf_u64(b, c->r.ctok + c->r.rtok);
    buf_lit(b, ",\"cache_read_input_tokens\":0,\"cache_creation_input_tokens\":0}");
}

static void anth_stop_reason(struct conn *c, struct buf *b)
{
    if (c->r.tool) {
        buf_lit(b, "\"tool_use\"");
    } else {
        buf_lit(b, "\"end_turn\"");
    }
}

/* The content block of the answer (text or tool_use), complete. */
static void anth_block_json(struct conn *c, struct buf *b)
{
    if (c->r.tool) {
        buf_lit(b, "{\"type\":\"tool_use\",\"id\":\"toolu_");
        buf_u64(b, c->r.seq);
        buf_lit(b, "\",\"name\":");
        buf_add(b, c->tool_name.p, c->tool_name.len);
        buf_lit(b, ",\"input\":");
        buf_add(b, c->content.p, c->content.len);       /* a JSON object */
        buf_lit(b, "}");
    } else {
        buf_lit(b, "{\"type\":\"text\",\"text\":");
        js_str(b, c->content.p, c->content.len);
        buf_lit(b, "}");
    }
}

/* A non-stream answer of the Anthropic Messages API. */
static void anth_json(struct conn *c, struct buf *b)
{
    struct req *r = &c->r;
    buf_lit(b, "{\"id\":\"msg_");
    buf_u64(b, r->seq);
    buf_lit(b, "\",\"type\":\"message\",\"role\":\"assistant\",\"model\":");
    buf_add(b, c->model.p, c->model.len);
    buf_lit(b, ",\"content\":[");
    if (r->reasoner) {
        buf_lit(b, "{\"type\":\"thinking\",\"thinking\":");
        js_str(b, c->reasoning.p, c->reasoning.len);
        buf_lit(b, ",\"signature\":\"sig\"},");
    }
    anth_block_json(c, b);
    buf_lit(b, "],\"stop_reason\":");
    anth_stop_reason(c, b);
    buf_lit(b, ",\"stop_sequence\":null,\"usage\":");
    anth_usage_json(c, b);
    buf_lit(b, "}");
}

static void compl_json(struct conn *c, struct buf *b)
{
    struct req *r = &c->r;
    buf_lit(b, "{\"id\":\"cmpl-");
    buf_u64(b, r->seq);
    buf_lit(b, "\",\"object\":\"text_completion\",\"created\":");
    buf_i64(b, (int64_t)r->created);
    buf_lit(b, ",\"model\":");
    buf_add(b, c->model.p, c->model.len);
    buf_lit(b, ",\"choices\":[{\"text\":");
    js_str(b, c->content.p, c->content.len);
    buf_lit(b, ",\"index\":0,\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":");
    usage_json(c, b);
    buf_lit(b, ",\"system_fingerprint\":\"fp_fake\"}");
}

static void embed_json(struct conn *c, struct buf *b)
{
    buf_lit(b, "{\"object\":\"list\",\"data\":[");
    buf_add(b, c->content.p, c->content.len);       /* built by model_prepare */
    buf_lit(b, "],\"model\":");
    buf_add(b, c->model.p, c->model.len);
    buf_lit(b, ",\"usage\":{\"prompt_tokens\":");
    buf_u64(b, c->r.ptok);
    buf_lit(b, ",\"total_tokens\":");
    buf_u64(b, c->r.ptok);
    buf_lit(b, "}}");
}

static void echo_json(struct conn *c, struct buf *b)
{
    struct span head = { c->head.p, c->head.len }, body = { c->body.p, c->body.len };
    buf_lit(b, "{");
    js_request(b, head, body);
    buf_lit(b, "}");
}

/* Appends the text of a message "content": a string, or the text parts of
 * an array of parts. */
static void text_of(struct buf *out, json_t *content)
{
    if (json_is_string(content)) {
        buf_add(out, json_string_value(content), json_string_length(content));
        return;
    }
    if (!json_is_array(content)) {
        return;
    }
    size_t i;
    json_t *part;
    json_array_foreach(content, i, part) {
        if (json_is_string(part)) {
            buf_add(out, json_string_value(part), json_string_length(part));
            continue;
        }
        json_t *type = json_object_get(part, "type");
        json_t *text = json_object_get(part, "text");
        if (json_is_string(text) && (type == NULL || (json_is_string(type) &&
                                                      strcmp(json_string_value(type), "text") == 0))) {
            buf_add(out, json_string_value(text), json_string_length(text));
        }
    }
}

/* Appends the text of an Anthropic message "content": a string, or the
 * text blocks of an array, and the content (string or text blocks) of its
 * tool_result blocks.  True when it has a tool_result block. */
static bool anth_text_of(struct buf *out, json_t *content)
{
    bool result = false;
    if (!json_is_array(content)) {
        text_of(out, content);
        return false;
    }
    size_t i;
    json_t *block;
    json_array_foreach(content, i, block) {
        json_t *type = json_object_get(block, "type");
        if (json_is_string(type) && strcmp(json_string_value(type), "tool_result") == 0) {
            result = true;
            text_of(out, json_object_get(block, "content"));
        } else if (json_is_string(type) && strcmp(json_string_value(type), "text") == 0) {
            json_t *text = json_object_get(block, "text");
            if (json_is_string(text)) {
                buf_add(out, json_string_value(text), json_string_length(text));
            }
        }
    }
    return result;
}

/* Does TEXT hold the tool trigger "use tool"? */
static bool has_trigger(const struct buf *text)
{
    return text->len && memmem(text->p, text->len, "use tool", 8) != NULL;
}

/* The name of the first tool of a "tools" array (OpenAI: .function.name,
 * Anthropic: .name) as a quoted JSON string into OUT; false when there is
 * no tool. */
static bool first_tool(struct buf *out, json_t *tools, bool anth)
{
    if (!json_is_array(tools) || json_array_size(tools) == 0) {
        return false;
    }
    json_t *t = json_array_get(tools, 0);
    json_t *name = anth ? json_object_get(t, "name")
                        : json_object_get(json_object_get(t, "function"), "name");
    out->len = 0;
    js_cstr(out, json_is_string(name) ? json_string_value(name) : "tool");
    return true;
}

/* DeepSeek's rule for thinking models: an assistant message with tool_calls
 * must carry its reasoning_content back.  -1 with C->errmsg set when a
 * message of MSGS breaks it. */
static int reasoning_rule(struct conn *c, json_t *msgs)
{
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m) {
        json_t *role = json_object_get(m, "role");
        json_t *calls = json_object_get(m, "tool_calls");
        json_t *rc = json_object_get(m, "reasoning_content");
        if (json_is_string(role) && strcmp(json_string_value(role), "assistant") == 0 &&
            json_is_array(calls) && json_array_size(calls) > 0 && (rc == NULL || json_is_null(rc))) {
            c->errmsg.len = 0;
            buf_printf(&c->errmsg, "Missing `reasoning_content` field in the assistant message at "
                       "message index %zu. For more information, please refer to "
                       "https://api-docs.deepseek.com/guides/thinking_mode#tool-calls", i);
            return -1;
        }
    }
    return 0;
}

static bool is_role(json_t *msg, const char *role)
{
    json_t *v = json_object_get(msg, "role");
    return json_is_string(v) && strcmp(json_string_value(v), role) == 0;
}

static void embed_one(struct buf *b, size_t index, const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    }
    if (index) {
        buf_lit(b, ",");
    }
    buf_lit(b, "{\"object\":\"embedding\",\"index\":");
    buf_u64(b, index);
    buf_lit(b, ",\"embedding\":[");
    for (int d = 0; d < 8; d++) {
        double v = (double)(splitmix64(&h) >> 11) * 0x1.0p-53 * 2.0 - 1.0;
        buf_printf(b, d ? ",%.6f" : "%.6f", v);
    }
    buf_lit(b, "]}");
}

/*
 * Parses the JSON body of a completion request and prepares the answer in C:
 * model, content (split for a stream), reasoning, usage, embeddings.
 * -1 with C->errmsg set when the body is not a JSON object.
 */
static int model_prepare(struct conn *c)
{
    struct req *r = &c->r;
    json_error_t jerr;
    json_t *root = json_loadb(c->body.p ? c->body.p : "", c->body.len, 0, &jerr);

    if (root == NULL || !json_is_object(root)) {
        c->errmsg.len = 0;
        if (root == NULL) {
            buf_printf(&c->errmsg, "Failed to parse the request body as JSON: %s (line %d column %d)",
                       jerr.text, jerr.line, jerr.column);
        } else {
            buf_str(&c->errmsg, "Failed to parse the request body: expected a JSON object");
        }
        json_decref(root);
        return -1;
    }

    json_t *jm = json_object_get(root, "model");
    const char *model = json_is_string(jm) ? json_string_value(jm) : "deepseek-chat";
    c->model.len = 0;
    js_cstr(&c->model, model);
    r->stream = r->ep != EP_EMBED && r->ep != EP_ANTH_COUNT &&
                json_is_true(json_object_get(root, "stream"));
    r->reasoner = r->ep == EP_CHAT &&
                  (strstr(model, "reasoner") != NULL || strcmp(model, "deepseek-v4-pro") == 0);
    if (r->ep == EP_ANTH) {
        json_t *th = json_object_get(json_object_get(root, "thinking"), "type");
        r->reasoner = strstr(model, "reasoner") != NULL ||
                      (json_is_string(th) && strcmp(json_string_value(th), "enabled") == 0);
        r->anth_done = r->x_anth_done >= 0 ? r->x_anth_done == 1 : c->f->opt.anthropic_done;
    }
    r->tool = false;

    struct buf text = { 0 };
    c->content.len = 0;
    if (r->ep == EP_EMBED) {
        json_t *in = json_object_get(root, "input");
        size_t n = 0;
        if (json_is_array(in) && json_array_size(in) > 0 &&
            json_is_string(json_array_get(in, 0))) {
            size_t i;
            json_t *v;
            json_array_foreach(in, i, v) {
                const char *s = json_is_string(v) ? json_string_value(v) : "";
                size_t len = json_is_string(v) ? json_string_length(v) : 0;
                embed_one(&c->content, n++, s, len);
                buf_add(&text, s, len);
            }
        } else {
            text_of(&text, in);
            embed_one(&c->content, n++, text.p ? text.p : "", text.len);
        }
        r->nembed = n;
        r->ptok = 1 + text.len / 4;
        buf_free(&text);
        json_decref(root);
        return 0;
    }

    if (r->ep == EP_CHAT) {
        json_t *msgs = json_object_get(root, "messages");
        if (r->reasoner && json_is_array(msgs) && reasoning_rule(c, msgs) < 0) {
            json_decref(root);
            return -1;
        }
        if (json_is_array(msgs) && json_array_size(msgs) > 0) {
            json_t *last = json_array_get(msgs, json_array_size(msgs) - 1);
            text_of(&text, json_object_get(last, "content"));
            r->tool = is_role(last, "user") && has_trigger(&text) &&
                      first_tool(&c->tool_name, json_object_get(root, "tools"), false);
        }
    } else if (r->ep == EP_ANTH || r->ep == EP_ANTH_COUNT) {
        json_t *msgs = json_object_get(root, "messages");
        if (json_is_array(msgs) && json_array_size(msgs) > 0) {
            json_t *last = json_array_get(msgs, json_array_size(msgs) - 1);
            bool result = anth_text_of(&text, json_object_get(last, "content"));
            r->tool = r->ep == EP_ANTH && !result && is_role(last, "user") &&
                      has_trigger(&text) &&
                      first_tool(&c->tool_name, json_object_get(root, "tools"), true);
        }
        if (r->ep == EP_ANTH_COUNT) {
            r->ptok = 1 + text.len / 4;
            buf_free(&text);
            json_decref(root);
            return 0;
        }
    } else {
        json_t *p = json_object_get(root, "prompt");
        if (json_is_array(p)) {
            p = json_array_get(p, 0);
        }
        text_of(&text, p);
    }
    json_decref(root);

    size_t nev = (size_t)r->x_events, ncp;
    if (r->tool) {
        /* the tool's arguments, {"query": text}: cut, never padded */
        buf_lit(&c->content, "{\"query\":");
        js_str(&c->content, text.p ? text.p : "", text.len);
        buf_lit(&c->content, "}");
        ncp = utf8_count(c->content.p, c->content.len);
        if (ncp < nev) {
            nev = ncp;
        }
    } else {
        buf_lit(&c->content, "echo: ");
        buf_add(&c->content, text.p, text.len);
        if (r->x_body_bytes > 0 && (size_t)r->x_body_bytes > c->content.len) {
            pad_to(&c->content, (size_t)r->x_body_bytes);
        }
        ncp = utf8_count(c->content.p, c->content.len);
        if (ncp < nev) {
            pad_to(&c->content, c->content.len + (nev - ncp));
            ncp = nev;
        }
    }
    r->nev = nev;
    if (r->stream) {
        if (c->bounds_cap < nev + 1) {
            c->bounds = xrealloc(c->bounds, (nev + 1) * sizeof *c->bounds);
            c->bounds_cap = nev + 1;
        }
        split_bounds(c->content.p, c->content.len, ncp, nev, c->bounds);
    }
    c->reasoning.len = 0;
    if (r->reasoner) {
        buf_lit(&c->reasoning, "thinking about: ");
        buf_add(&c->reasoning, text.p, text.len);
        split_bounds(c->reasoning.p, c->reasoning.len,
                     utf8_count(c->reasoning.p, c->reasoning.len), 2, c->rbounds);
    }
    r->ptok = 1 + text.len / 4;
    r->ctok = 1 + c->content.len / 4;
    r->rtok = r->reasoner ? 1 + c->reasoning.len / 4 : 0;
    buf_free(&text);
    return 0;
}

/* ------------------------------------------------------------ streams */

static void stream_prefix(struct conn *c)
{
    struct req *r = &c->r;
    struct buf *b = &c->prefix;
    b->len = 0;
    if (r->ep == EP_CHAT) {
        buf_lit(b, "data: {\"id\":\"chatcmpl-");
        buf_u64(b, r->seq);
        buf_lit(b, "\",\"object\":\"chat.completion.chunk\",\"created\":");
    } else {
        buf_lit(b, "data: {\"id\":\"cmpl-");
        buf_u64(b, r->seq);
        buf_lit(b, "\",\"object\":\"text_completion\",\"created\":");
    }
    buf_i64(b, (int64_t)r->created);
    buf_lit(b, ",\"model\":");
    buf_add(b, c->model.p, c->model.len);
    buf_lit(b, ",\"system_fingerprint\":\"fp_fake\",\"choices\":[{");
}

/*
 * Data event IDX of the stream, into B.  Chat: role, 2 reasoning deltas
 * (reasoner models), NEV content deltas, the finish chunk with usage,
 * [DONE].  Completions: NEV text pieces, the finish chunk, [DONE].
 */
static void stream_event(struct conn *c, size_t idx, struct buf *b)
{
    struct req *r = &c->r;
    if (idx == r->ev_total - 1) {
        buf_lit(b, "data: [DONE]\n\n");
        return;
    }
    buf_add(b, c->prefix.p, c->prefix.len);
    if (idx == r->ev_total - 2) {
        if (r->ep == EP_CHAT && r->tool) {
            buf_lit(b, "\"index\":0,\"delta\":{\"content\":\"\"},\"logprobs\":null,"
                       "\"finish_reason\":\"tool_calls\"}],\"usage\":");
        } else if (r->ep == EP_CHAT) {
            buf_lit(b, "\"index\":0,\"delta\":{\"content\":\"\"},\"logprobs\":null,"
                       "\"finish_reason\":\"stop\"}],\"usage\":");
        } else {
            buf_lit(b, "\"text\":\"\",\"index\":0,\"logprobs\":null,"
                       "\"finish_reason\":\"stop\"}],\"usage\":");
        }
        usage_json(c, b);
        buf_lit(b, "}\n\n");
        return;
    }
    if (r->ep == EP_CHAT) {
        if (idx == 0) {
            buf_lit(b, "\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
                       "\"logprobs\":null,\"finish_reason\":null}]}\n\n");
            return;
        }
        idx--;
        if (r->reasoner) {
            if (idx < 2) {
                buf_lit(b, "\"index\":0,\"delta\":{\"content\":null,\"reasoning_content\":");
                js_str(b, c->reasoning.p + c->rbounds[idx], c->rbounds[idx + 1] - c->rbounds[idx]);
                buf_lit(b, "},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
                return;
            }
            idx -= 2;
        }
        if (r->tool) {
            if (idx == 0) {
                buf_lit(b, "\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_");
                buf_u64(b, r->seq);
                buf_lit(b, "\",\"type\":\"function\",\"function\":{\"name\":");
                buf_add(b, c->tool_name.p, c->tool_name.len);
                buf_lit(b, ",\"arguments\":\"\"}}]},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
                return;
            }
            idx--;
            buf_lit(b, "\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":"
                       "{\"arguments\":");
            js_str(b, c->content.p + c->bounds[idx], c->bounds[idx + 1] - c->bounds[idx]);
            buf_lit(b, "}}]},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
            return;
        }
        buf_lit(b, "\"index\":0,\"delta\":{\"content\":");
        js_str(b, c->content.p + c->bounds[idx], c->bounds[idx + 1] - c->bounds[idx]);
        buf_lit(b, "},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
        return;
    }
    buf_lit(b, "\"text\":");
    js_str(b, c->content.p + c->bounds[idx], c->bounds[idx + 1] - c->bounds[idx]);
    buf_lit(b, ",\"index\":0,\"logprobs\":null,\"finish_reason\":null}]}\n\n");
}

/*
 * Event IDX of an Anthropic Messages stream, into B: message_start; with
 * thinking a thinking block (start, 2 thinking_delta, signature_delta,
 * stop); the text or tool_use block (start, NEV text_delta or
 * input_json_delta, stop); message_delta; message_stop; with anth_done
 * data: [DONE].
 */
static void anth_event(struct conn *c, size_t idx, struct buf *b)
{
    struct req *r = &c->r;
    size_t blk = r->reasoner ? 1 : 0;           /* index of the text / tool_use block */

    if (idx == 0) {
        buf_lit(b, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":"
                   "{\"id\":\"msg_");
        buf_u64(b, r->seq);
        buf_lit(b, "\",\"type\":\"message\",\"role\":\"assistant\",\"model\":");
        buf_add(b, c->model.p, c->model.len);
        buf_lit(b, ",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,"
                   "\"usage\":{\"input_tokens\":");
        buf_u64(b, r->ptok);
        buf_lit(b, ",\"output_tokens\":1,\"cache_read_input_tokens\":0,"
                   "\"cache_creation_input_tokens\":0}}}\n\n");
        return;
    }
    idx--;
    if (r->reasoner) {
        if (idx == 0) {
            buf_lit(b, "event: content_block_start\ndata: {\"type\":\"content_block_start\","
                       "\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\","
                       "\"signature\":\"\"}}\n\n");
            return;
        }
        if (idx == 1 || idx == 2) {
            buf_lit(b, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\","
                       "\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":");
            js_str(b, c->reasoning.p + c->rbounds[idx - 1], c->rbounds[idx] - c->rbounds[idx - 1]);
            buf_lit(b, "}}\n\n");
            return;
        }
        if (idx == 3) {
            buf_lit(b, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\","
                       "\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"sig\"}}\n\n");
            return;
        }
        if (idx == 4) {
            buf_lit(b, "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n");
            return;
        }
        idx -= 5;
    }
    if (idx == 0) {
        buf_lit(b, "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":");
        buf_u64(b, blk);
        if (r->tool) {
            buf_lit(b, ",\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_");
            buf_u64(b, r->seq);
            buf_lit(b, "\",\"name\":");
            buf_add(b, c->tool_name.p, c->tool_name.len);
            buf_lit(b, ",\"input\":{}}}\n\n");
        } else {
            buf_lit(b, ",\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
        }
        return;
    }
    idx--;
    if (idx < r->nev) {
        buf_lit(b, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":");
        buf_u64(b, blk);
        if (r->tool) {
            buf_lit(b, ",\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":");
        } else {
            buf_lit(b, ",\"delta\":{\"type\":\"text_delta\",\"text\":");
        }
        js_str(b, c->content.p + c->bounds[idx], c->bounds[idx + 1] - c->bounds[idx]);
        buf_lit(b, "}}\n\n");
        return;
    }
    idx -= r->nev;
    switch (idx) {
    case 0:
        buf_lit(b, "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":");
        buf_u64(b, blk);
        buf_lit(b, "}\n\n");
        return;
    case 1:
        buf_lit(b, "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":"
                   "{\"stop_reason\":");
        anth_stop_reason(c, b);
        buf_lit(b, ",\"stop_sequence\":null},\"usage\":{\"output_tokens\":");
        buf_u64(b, r->ctok + r->rtok);
        buf_lit(b, "}}\n\n");
        return;
    case 2:
        buf_lit(b, "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        return;
    default:
        buf_lit(b, "data: [DONE]\n\n");
        return;
    }
}

static void stream_head(struct conn *c)
{
    http_head(c, c->r.status, "text/event-stream; charset=utf-8", -1, "Cache-Control: no-cache\r\n");
    c->r.head_sent = true;
}

static void stream_start(struct conn *c)
{
    struct req *r = &c->r;
    if (!r->head_sent) {
        stream_head(c);
    }
    if (r->ep == EP_ANTH) {
        r->ev_total = 1 + (r->reasoner ? 5 : 0) + 1 + r->nev + 1 + 2 + (r->anth_done ? 1 : 0);
    } else {
        stream_prefix(c);
        r->ev_total = (r->ep == EP_CHAT ? 1 + (r->reasoner ? 2 : 0) + (r->tool ? 1 : 0) : 0) +
                      r->nev + 2;
    }
    r->ev_next = 0;
    r->data_sent = 0;
    c->rs = RS_STREAM;
}

/* Ends the stream when it is over, or cut by X-Fake-Reset-After or
 * X-Fake-Truncate.  True when it ended. */
static bool stream_stop(struct conn *c)
{
    struct req *r = &c->r;
    if (r->x_reset >= 0 && r->data_sent >= (size_t)r->x_reset && r->ev_next < r->ev_total) {
        r->after = AFTER_RST;
    } else if (r->x_trunc && r->data_sent >= r->ev_total / 2) {
        r->after = AFTER_CLOSE;
    } else if (r->ev_next >= r->ev_total) {
        out_end(c);
    } else {
        return false;
    }
    c->rs = RS_FLUSHING;
    return true;
}

/* Queues events until the stream ends, waits for a timer, or enough is
 * queued (the rest follows when the output drained). */
static void stream_pump(struct conn *c)
{
    struct req *r = &c->r;
    struct buf *b = &c->f->scratch;
    while (!stream_stop(c)) {
        b->len = 0;
        if (r->ep == EP_ANTH) {
            anth_event(c, r->ev_next, b);
        } else {
            stream_event(c, r->ev_next, b);
        }
        out_chunk(c, b->p, b->len);
        r->ev_next++;
        r->data_sent++;
        if (stream_stop(c)) {
            return;
        }
        if (r->x_ev_delay > 0) {
            r->wait_timer = true;
            conn_timer(c, TK_EVENT, r->x_ev_delay);
            return;
        }
        if (evbuffer_get_length(c->out) >= PUMP_MAX) {
            return;
        }
    }
}

/* ------------------------------------------------------------ requests */

static enum ep route(const struct req *r)
{
    struct span p = r->path;
    if (p.n > 2 && p.p[1] == '_') {
        if (span_eq(p, "/_stats")) {
            return EP_STATS;
        }
        if (span_eq(p, "/_reset")) {
            return EP_RESET;
        }
        if (span_eq(p, "/_log")) {
            return EP_LOG;
        }
        if (span_eq(p, "/_config")) {
            return EP_CONFIG;
        }
    }
    if (span_eq(r->method, "POST")) {
        if (span_eq(p, "/v1/chat/completions") || span_eq(p, "/chat/completions")) {
            return EP_CHAT;
        }
        if (span_eq(p, "/v1/completions") || span_eq(p, "/completions")) {
            return EP_COMPL;
        }
        if (span_eq(p, "/v1/embeddings") || span_eq(p, "/embeddings")) {
            return EP_EMBED;
        }
        if (span_eq(p, "/anthropic/v1/messages") || span_eq(p, "/v1/messages")) {
            return EP_ANTH;
        }
        if (span_eq(p, "/anthropic/v1/messages/count_tokens") ||
            span_eq(p, "/v1/messages/count_tokens")) {
            return EP_ANTH_COUNT;
        }
    } else if (span_eq(r->method, "GET") || span_eq(r->method, "HEAD")) {
        if (span_eq(p, "/v1/models") || span_eq(p, "/models")) {
            return EP_MODELS;
        }
    }
    return EP_ECHO;
}

/* Is P a path of the Anthropic Messages API (/anthropic/..., /v1/messages...)? */
static bool path_anth(struct span p)
{
    static const char a[] = "/anthropic/", m[] = "/v1/messages";
    if (p.n >= sizeof a - 1 && memcmp(p.p, a, sizeof a - 1) == 0) {
        return true;
    }
    return p.n >= sizeof m - 1 && memcmp(p.p, m, sizeof m - 1) == 0 &&
           (p.n == sizeof m - 1 || p.p[sizeof m - 1] == '/');
}

/* Takes the request of C out of the hold FIFO (admitted, cut or gone). */
static void hold_leave(struct conn *c, int64_t now)
{
    struct fake *f = c->f;
    struct req *r = &c->r;
    if (c->hold_prev) {
        c->hold_prev->hold_next = c->hold_next;
    } else {
        f->hold_head = c->hold_next;
    }
    if (c->hold_next) {
        c->hold_next->hold_prev = c->hold_prev;
    } else {
        f->hold_tail = c->hold_prev;
    }
    c->hold_prev = c->hold_next = NULL;
    f->cheld--;
    if (r->gen == f->gen) {
        f->st.held--;
    }
    r->held = false;
    struct logent *e = log_find(f, r);
    if (e) {
        e->held_ms = now - r->t_held;
    }
}

/* Ends the active request of C: counters, /_log, access line.  CLOSED: the
 * client left before the answer was complete. */
static void req_end(struct conn *c, bool closed)
{
    struct fake *f = c->f;
    struct req *r = &c->r;
    int64_t now = now_ms();

    evtimer_del(c->tev);
    r->wait_timer = false;
    c->rs = RS_IDLE;
    c->ps = PS_HEAD;
    c->scan = 0;
    buf_trim(&c->body);
    buf_trim(&c->content);
    buf_trim(&c->reasoning);
    buf_trim(&f->scratch);
    if (c->bounds_cap > 65536) {
        free(c->bounds);
        c->bounds = NULL;
        c->bounds_cap = 0;
    }
    if (!r->counted) {
        return;
    }
    if (r->held) {
        hold_leave(c, now);
    }
    if (r->completion) {
        f->cinflight--;
        if (f->hold_head) {
            event_active(f->admitter, EV_READ, 0);
        }
    }
    if (r->gen == f->gen) {
        f->st.inflight--;
        if (closed) {
            f->st.client_closed++;
        } else {
            f->st.completed++;
        }
    }
    struct logent *e = log_find(f, r);
    if (e) {
        e->t_end = now;
        e->status = r->sent_status;
        if (closed) {
            e->client_closed = true;
            e->t_closed = now;
        }
    }
    if (!f->opt.quiet) {
        fprintf(stderr, "fake%s%s: #%" PRIu64 " %.*s %.*s -> %d%s%s%s %" PRId64 " ms\n",
                f->opt.name ? " " : "", f->opt.name ? f->opt.name : "", r->seq,
                (int)r->method.n, r->method.p, (int)r->path.n, r->path.p, r->sent_status,
                r->stream ? " stream" : "", r->was_held ? " held" : "",
                closed ? " client-closed" : "", now - r->t_start);
    }
}

/* The answer of the active request, now that its delay (if any) is over. */
static void answer_now(struct conn *c)
{
    struct req *r = &c->r;
    struct buf *b = &c->f->scratch;

    if (r->x_garbage) {
        static const char garbage[] = "HTTP/1.1 XYZ Garbage!\r\n\x01\x02 this is not HTTP \xff\r\n\r\n";
        evbuffer_add(c->out, garbage, sizeof garbage - 1);
        r->after = AFTER_CLOSE;
        c->rs = RS_FLUSHING;
        return;
    }
    if (r->x_reset >= 0 && !(r->stream && status_normal(r->status))) {
        r->after = AFTER_RST;                   /* not a stream: reset, no answer */
        c->rs = RS_FLUSHING;
        return;
    }
    b->len = 0;
    if (r->x_redirect.n) {
        struct buf extra = { 0 };
        buf_lit(&extra, "Location: ");
        buf_add(&extra, r->x_redirect.p, r->x_redirect.n);
        buf_add(&extra, "\r\n", 3);          /* with the NUL: a C string */
        buf_lit(b, "{\"redirect\":");
        js_str(b, r->x_redirect.p, r->x_redirect.n);
        buf_lit(b, "}");
        r->status = 302;
        answer_body(c, 302, "application/json", b, extra.p);
        buf_free(&extra);
        return;
    }
    if (!status_normal(r->status)) {
        if (!status_no_body(r->status)) {
            error_json(c, b);
        }
        answer_body(c, r->status, "application/json", b, NULL);
        return;
    }
    switch (r->ep) {
    case EP_CHAT:
    case EP_COMPL:
        if (r->stream) {
            stream_start(c);
            return;
        }
        if (r->ep == EP_CHAT) {
            chat_json(c, b);
        } else {
            compl_json(c, b);
        }
        break;
    case EP_ANTH:
        if (r->stream) {
            stream_start(c);
            return;
        }
        anth_json(c, b);
        break;
    case EP_ANTH_COUNT:
        buf_lit(b, "{\"input_tokens\":");
        buf_u64(b, r->ptok);
        buf_lit(b, "}");
        break;
    case EP_EMBED:
        embed_json(c, b);
        break;
    case EP_MODELS:
        buf_add(b, models_json, sizeof models_json - 1);
        break;
    default:
        echo_json(c, b);
        break;
    }
    answer_body(c, r->status, "application/json", b, NULL);
}

/* A keep-alive line on a started answer. */
static void out_keepalive(struct conn *c)
{
    if (c->r.stream) {
        out_chunk(c, ": keep-alive\n\n", 14);
    } else {
        out_chunk(c, "\n", 1);
    }
}

/* Ends the active request by closing the connection after what was sent,
 * without the rest of the answer (no terminating chunk); /_log shows no
 * status. */
static void answer_cut(struct conn *c)
{
    c->r.after = AFTER_CLOSE;
    c->r.sent_status = 0;
    c->rs = RS_FLUSHING;
}

/* During a delay with X-Fake-Keepalive-Ms (or X-Fake-First-Token-Ms,
 * X-Fake-Hold-Close-Ms): the 200 head went out already; send a keep-alive,
 * or, once the delay is over, the answer (or the close). */
static void keepalive_tick(struct conn *c)
{
    struct req *r = &c->r;
    int64_t now = now_ms();
    if (now >= r->deadline) {
        if (r->ka_close) {
            answer_cut(c);
        } else {
            answer_now(c);
        }
        return;
    }
    if (now >= r->next_ka) {
        out_keepalive(c);
        r->next_ka = now + r->ka_every;
    }
    int64_t next = r->next_ka < r->deadline ? r->next_ka : r->deadline;
    conn_timer(c, TK_TICK, next - now);
}

static void config_json(struct fake *f, struct buf *b)
{
    buf_lit(b, "{\"capacity\":");
    buf_i64(b, f->opt.capacity);
    buf_lit(b, ",\"hold\":");
    if (f->opt.hold) {
        buf_lit(b, "true");
    } else {
        buf_lit(b, "false");
    }
    buf_lit(b, ",\"hold_max_ms\":");
    buf_i64(b, f->opt.hold_max_ms);
    buf_lit(b, ",\"hold_keepalive_ms\":");
    buf_i64(b, f->opt.hold_ka_ms);
    buf_lit(b, ",\"latency_ms\":");
    buf_i64(b, f->opt.latency_ms);
    buf_lit(b, ",\"account_limit\":");
    buf_i64(b, f->opt.account_limit);
    buf_lit(b, ",\"fail_next\":");
    buf_i64(b, f->opt.fail_next);
    buf_lit(b, ",\"fail_status\":");
    buf_i64(b, f->opt.fail_status);
    buf_lit(b, ",\"anthropic_done\":");
    if (f->opt.anthropic_done) {
        buf_lit(b, "true");
    } else {
        buf_lit(b, "false");
    }
    buf_lit(b, "}");
}

/* POST /_config with a JSON object: sets the fields it names (all or
 * none).  0, or -1 with C->errmsg set. */
static int config_set(struct conn *c)
{
    static const struct {
        const char *key;
        long min, max;
    } keys[] = {
        { "capacity", 0, LONG_MAX }, { "hold_max_ms", 0, MAX_MS },
        { "hold_keepalive_ms", 1, MAX_MS }, { "latency_ms", 0, MAX_MS },
        { "account_limit", 0, LONG_MAX }, { "fail_next", 0, LONG_MAX },
        { "fail_status", 200, 599 },
    };
    struct fake *f = c->f;
    long *dst[] = { &f->opt.capacity, &f->opt.hold_max_ms, &f->opt.hold_ka_ms,
                    &f->opt.latency_ms, &f->opt.account_limit, &f->opt.fail_next,
                    &f->opt.fail_status };
    long val[sizeof keys / sizeof keys[0]];
    bool set[sizeof keys / sizeof keys[0]] = { false };
    int hold = -1, done = -1;
    json_error_t jerr;
    json_t *root = json_loadb(c->body.p ? c->body.p : "", c->body.len, 0, &jerr);
    const char *k;
    json_t *v;

    c->errmsg.len = 0;
    if (!json_is_object(root)) {
        buf_str(&c->errmsg, "/_config: want a JSON object");
        json_decref(root);
        return -1;
    }
    json_object_foreach(root, k, v) {
        if (strcmp(k, "hold") == 0 && json_is_boolean(v)) {
            hold = json_is_true(v);
            continue;
        }
        if (strcmp(k, "anthropic_done") == 0 && json_is_boolean(v)) {
            done = json_is_true(v);
            continue;
        }
        size_t i = 0;
        while (i < sizeof keys / sizeof keys[0] && strcmp(k, keys[i].key) != 0) {
            i++;
        }
        if (i == sizeof keys / sizeof keys[0] || !json_is_integer(v) ||
            json_integer_value(v) < keys[i].min || json_integer_value(v) > keys[i].max) {
            buf_printf(&c->errmsg, "/_config: bad field \"%s\"", k);
            json_decref(root);
            return -1;
        }
        val[i] = (long)json_integer_value(v);
        set[i] = true;
    }
    json_decref(root);
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        if (set[i]) {
            *dst[i] = val[i];
        }
    }
    if (hold >= 0) {
        f->opt.hold = hold;
    }
    if (done >= 0) {
        f->opt.anthropic_done = done;
    }
    /* the held requests: new limits from now on, and room maybe */
    for (struct conn *h = f->hold_head; h; h = h->hold_next) {
        conn_timer(h, TK_TICK, 0);
    }
    if (f->hold_head) {
        event_active(f->admitter, EV_READ, 0);
    }
    return 0;
}

static void control_answer(struct conn *c)
{
    struct fake *f = c->f;
    struct req *r = &c->r;
    struct buf *b = &f->scratch;

    r->counted = false;
    r->x_trunc = false;
    b->len = 0;
    switch (r->ep) {
    case EP_STATS:
        stats_json(f, b);
        break;
    case EP_RESET:
        fake_reset(f);
        buf_lit(b, "{\"ok\":true}");
        break;
    case EP_CONFIG:
        if (span_eq(r->method, "GET") || span_eq(r->method, "HEAD")) {
            config_json(f, b);
        } else if (config_set(c) < 0) {
            r->status = 400;
            r->bad_json = true;
            error_json(c, b);
            answer_body(c, 400, "application/json", b, NULL);
            return;
        } else {
            buf_lit(b, "{\"ok\":true}");
        }
        break;
    default:
        log_json(f, b);
        break;
    }
    r->status = 200;
    answer_body(c, 200, "application/json", b, NULL);
}

/* Can the answer start with a 200 head and keep-alives before it is known?
 * (The answer will be 2xx with a body.) */
static bool ka_ok(const struct req *r)
{
    return status_normal(r->status) && !r->x_garbage && !r->x_redirect.n && !r->head_method;
}

/* The head of an answer whose body comes later, chunked. */
static void ka_head(struct conn *c)
{
    struct req *r = &c->r;
    if (r->stream) {
        stream_head(c);
    } else {
        http_head(c, r->status, "application/json", -1, NULL);
        r->head_sent = true;
    }
}

/* The answer of C is decided (status, model, R->delay): answer now, or wait
 * from T0 (RS_DELAY, or RS_KEEPALIVE with the head out). */
static void req_start(struct conn *c, int64_t t0)
{
    struct req *r = &c->r;
    int64_t delay = r->ka_close ? r->x_hold_close : r->delay;

    if (delay <= 0 && !r->ka_close) {
        answer_now(c);
        return;
    }
    r->deadline = t0 + delay;
    if (r->head_sent || r->ka_close || ((r->x_ka > 0 || r->x_first >= 0) && ka_ok(r))) {
        if (!r->head_sent) {
            ka_head(c);
        }
        r->next_ka = r->ka_every > 0 ? (r->was_held ? r->last_ka : t0) + r->ka_every : INT64_MAX;
        c->rs = RS_KEEPALIVE;
        conn_timer(c, TK_TICK, (r->next_ka < r->deadline ? r->next_ka : r->deadline) - t0);
        return;
    }
    c->rs = RS_DELAY;
    conn_timer(c, TK_TICK, delay);
}

/* Keep-alive interval of a held request. */
static long hold_ka_every(struct conn *c)
{
    return c->r.x_ka > 0 ? c->r.x_ka : c->f->opt.hold_ka_ms;
}

/* While held: a keep-alive when due, or the close after --hold-max-ms. */
static void hold_tick(struct conn *c)
{
    struct fake *f = c->f;
    struct req *r = &c->r;
    int64_t now = now_ms();
    int64_t deadline = r->t_held + f->opt.hold_max_ms;
    int64_t every = hold_ka_every(c);

    if (now >= deadline) {
        hold_leave(c, now);
        if (r->gen == f->gen) {
            f->st.hold_closed++;
        }
        answer_cut(c);
        return;
    }
    if (now >= r->last_ka + every) {
        out_keepalive(c);
        r->last_ka = now;
    }
    int64_t next = r->last_ka + every < deadline ? r->last_ka + every : deadline;
    conn_timer(c, TK_TICK, next - now);
}

/* Over capacity with --hold: the 200 head now, then keep-alives at the end
 * of the FIFO until admitted or cut. */
static void hold_enter(struct conn *c)
{
    struct fake *f = c->f;
    struct req *r = &c->r;
    r->held = r->was_held = true;
    r->t_held = r->last_ka = now_ms();
    c->hold_prev = f->hold_tail;
    c->hold_next = NULL;
    if (f->hold_tail) {
        f->hold_tail->hold_next = c;
    } else {
        f->hold_head = c;
    }
    f->hold_tail = c;
    f->cheld++;
    f->st.held++;
    f->st.held_total++;
    ka_head(c);
    c->rs = RS_HELD;
    hold_tick(c);
}

/* Admits held requests, oldest first, while the capacity has room. */
static void admit_cb(evutil_socket_t fd, short what, void *arg)
{
    struct fake *f = arg;
    (void)fd;
    (void)what;
    while (f->hold_head &&
           (f->opt.capacity == 0 || f->cinflight - f->cheld < f->opt.capacity)) {
        struct conn *c = f->hold_head;
        int64_t now = now_ms();
        hold_leave(c, now);
        c->r.ka_every = hold_ka_every(c);
        req_start(c, now);
        conn_step(c);
    }
}

/* A complete request was parsed: count it, decide its answer and when. */
static void req_dispatch(struct conn *c)
{
    struct fake *f = c->f;
    struct req *r = &c->r;
    bool reused = c->nreq++ > 0;

    r->ep = route(r);
    r->after = r->keepalive ? AFTER_KEEP : AFTER_CLOSE;
    if (r->ep >= EP_STATS) {
        control_answer(c);
        return;
    }
    r->counted = true;
    r->gen = f->gen;
    r->seq = ++f->seq;
    r->t_start = now_ms();
    r->created = time(NULL);
    f->st.requests++;
    if (++f->st.inflight > f->st.max_inflight) {
        f->st.max_inflight = f->st.inflight;
    }
    r->completion = r->ep == EP_CHAT || r->ep == EP_COMPL || r->ep == EP_EMBED || r->ep == EP_ANTH;
    r->anth = path_anth(r->path);
    bool parsed = r->completion || r->ep == EP_ANTH_COUNT;     /* the body is read */
    if (r->completion) {
        f->cinflight++;
    }
    log_add(f, c);

    if (r->x_reset_reused && reused) {
        r->after = AFTER_RST;                    /* before any byte of an answer */
        c->rs = RS_FLUSHING;
        return;
    }
    if (r->x_never) {
        c->rs = RS_NEVER;
        return;
    }
    r->delay = r->x_first >= 0 ? r->x_first : r->x_delay;
    r->ka_every = r->x_ka;
    bool over = r->completion &&
                ((f->opt.capacity > 0 && f->cinflight - f->cheld > f->opt.capacity) ||
                 f->hold_head != NULL);         /* none overtakes a held one */
    if (r->completion && f->opt.account_limit > 0 && f->cinflight > f->opt.account_limit) {
        r->status = 429;                         /* at once */
        r->acct = true;
        r->delay = 0;
        over = false;
    } else if (over && !f->opt.hold) {
        r->status = 503;                         /* at once */
        r->delay = 0;
    } else if (r->x_hold_close >= 0 && !r->head_method) {
        r->status = 200;                         /* keep-alives, then close */
        if (r->completion) {
            model_prepare(c);                    /* for "stream"; not JSON: no stream */
        }
        r->ka_close = true;
        r->ka_every = r->x_ka > 0 ? r->x_ka : DEFAULT_KA_MS;
    } else {
        if (r->x_status) {
            r->status = (int)r->x_status;
        } else if (r->completion && f->opt.fail_next > 0) {
            f->opt.fail_next--;
            r->status = (int)f->opt.fail_status;
        } else if (r->completion && f->opt.status) {
            r->status = f->opt.status;
        } else if (r->completion && f->opt.fail_rate > 0 && rng_unit(f) < f->opt.fail_rate) {
            r->status = 503;
        } else {
            r->status = 200;
        }
        if (r->completion) {
            r->delay += f->opt.latency_ms;
        }
        if (parsed && status_normal(r->status) && model_prepare(c) < 0) {
            r->status = 400;
            r->bad_json = true;
        }
    }
    if (over && f->opt.hold) {
        if (r->ka_close || ka_ok(r)) {
            hold_enter(c);
            return;
        }
        r->status = 503;                         /* no 2xx answer: not held */
        r->bad_json = false;
        r->delay = 0;
    }
    req_start(c, r->t_start);
}

/* ------------------------------------------------------------ parsing */

enum presult { P_MORE, P_DONE, P_ERROR };

/* The head in C->head: request line and headers into C->r.  0, or -1 with
 * *ERR the status to answer. */
static int req_parse_head(struct conn *c, int *err)
{
    struct req *r = &c->r;
    const char *p = c->head.p, *end = c->head.p + c->head.len;
    struct span l, name, v;
    bool have_cl = false;

    memset(r, 0, sizeof *r);
    r->clen = -1;
    r->x_reset = -1;
    r->x_first = -1;
    r->x_hold_close = -1;
    r->x_anth_done = -1;
    r->x_events = DEFAULT_EVENTS;
    *err = 400;
    if (!head_line(&p, end, &l) ||
        reqline_split(l, &r->method, &r->path, &r->query, &r->minor) < 0) {
        return -1;
    }
    r->keepalive = r->minor == 1;
    r->head_method = span_eq(r->method, "HEAD");
    while (head_line(&p, end, &l) && l.n > 0) {
        if (hdr_split(l, &name, &v) < 0) {
            return -1;
        }
        if (name.n > 7 && strncasecmp(name.p, "x-fake-", 7) == 0) {
            struct span s = { name.p + 7, name.n - 7 };
            long n;
            if (span_ieq(s, "status")) {
                if (span_num(v, 999, &n) && n >= 200 && n <= 599) {
                    r->x_status = n;
                }
            } else if (span_ieq(s, "retry-after")) {
                r->x_retry = v;
            } else if (span_ieq(s, "delay-ms")) {
                span_num(v, MAX_MS, &r->x_delay);
            } else if (span_ieq(s, "keepalive-ms")) {
                span_num(v, MAX_MS, &r->x_ka);
            } else if (span_ieq(s, "first-token-ms")) {
                span_num(v, MAX_MS, &r->x_first);
            } else if (span_ieq(s, "hold-close-ms")) {
                span_num(v, MAX_MS, &r->x_hold_close);
            } else if (span_ieq(s, "reset-reused")) {
                r->x_reset_reused = span_true(v);
            } else if (span_ieq(s, "events")) {
                if (span_num(v, MAX_EVENTS, &n) && n >= 1) {
                    r->x_events = n;
                }
            } else if (span_ieq(s, "event-delay-ms")) {
                span_num(v, MAX_MS, &r->x_ev_delay);
            } else if (span_ieq(s, "reset-after")) {
                span_num(v, LONG_MAX / 2, &r->x_reset);
            } else if (span_ieq(s, "truncate")) {
                r->x_trunc = span_true(v);
            } else if (span_ieq(s, "never")) {
                r->x_never = span_true(v);
            } else if (span_ieq(s, "body-bytes")) {
                span_num(v, MAX_PAD, &r->x_body_bytes);
            } else if (span_ieq(s, "garbage")) {
                r->x_garbage = span_true(v);
            } else if (span_ieq(s, "redirect")) {
                r->x_redirect = v;
            } else if (span_ieq(s, "anthropic-done")) {
                r->x_anth_done = span_true(v) ? 1 : 0;
            }
            continue;
        }
        switch (name.n) {
        case 14:
            if (span_ieq(name, "content-length")) {
                long n;
                if (!span_num(v, LONG_MAX, &n) || (have_cl && n != r->clen)) {
                    return -1;
                }
                if (n > MAX_BODY) {
                    *err = 413;
                    return -1;
                }
                have_cl = true;
                r->clen = n;
            }
            break;
        case 17:
            if (span_ieq(name, "transfer-encoding")) {
                if (!span_ieq(v, "chunked") || r->minor == 0) {
                    *err = span_ieq(v, "chunked") ? 400 : 501;
                    return -1;
                }
                r->chunked = true;
            }
            break;
        case 10:
            if (span_ieq(name, "connection")) {
                if (span_has_token(v, "close")) {
                    r->keepalive = false;
                } else if (span_has_token(v, "keep-alive")) {
                    r->keepalive = true;
                }
            }
            break;
        case 6:
            if (span_ieq(name, "expect") && span_ieq(v, "100-continue")) {
                r->expect100 = true;
            }
            break;
        default:
            break;
        }
    }
    if (r->chunked && have_cl) {
        return -1;
    }
    return 0;
}

/* Reads one request from C->in, as far as it has arrived. */
static enum presult conn_parse(struct conn *c, int *err)
{
    for (;;) {
        size_t avail = evbuffer_get_length(c->in);
        switch (c->ps) {
        case PS_HEAD: {
            /* empty lines before a request line are allowed (RFC 9112 2.2) */
            while (avail > 0) {
                unsigned char ch;
                evbuffer_copyout(c->in, &ch, 1);
                if (ch != '\r' && ch != '\n') {
                    break;
                }
                evbuffer_drain(c->in, 1);
                avail--;
            }
            if (avail == 0) {
                c->scan = 0;
                return P_MORE;
            }
            size_t lim = avail < MAX_HEAD ? avail : MAX_HEAD;
            const char *s = (const char *)evbuffer_pullup(c->in, (ssize_t)lim);
            size_t i = c->scan, end = 0;
            const char *nl;
            while (i < lim && (nl = memchr(s + i, '\n', lim - i)) != NULL) {
                size_t k = (size_t)(nl - s);
                if (k + 1 < lim && s[k + 1] == '\n') {
                    end = k + 2;
                    break;
                }
                if (k + 2 < lim && s[k + 1] == '\r' && s[k + 2] == '\n') {
                    end = k + 3;
                    break;
                }
                i = k + 1;
            }
            if (end == 0) {
                if (avail >= MAX_HEAD) {
                    *err = 431;
                    return P_ERROR;
                }
                c->scan = lim >= 2 ? lim - 2 : 0;
                return P_MORE;
            }
            c->head.len = 0;
            buf_add(&c->head, s, end);
            evbuffer_drain(c->in, end);
            c->scan = 0;
            if (req_parse_head(c, err) < 0) {
                return P_ERROR;
            }
            c->body.len = 0;
            if (c->r.chunked) {
                c->ps = PS_CHUNK_SIZE;
            } else if (c->r.clen > 0) {
                c->ps = PS_BODY;
                c->left = c->r.clen;
                buf_grow(&c->body, (size_t)c->r.clen);
            } else {
                c->ps = PS_DONE;
            }
            if (c->r.expect100 && c->r.minor == 1 &&
                (c->r.chunked || (size_t)c->r.clen > evbuffer_get_length(c->in))) {
                evbuffer_add(c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
            }
            break;
        }
        case PS_BODY: {
            size_t n = avail < (size_t)c->left ? avail : (size_t)c->left;
            if (n) {
                buf_grow(&c->body, n);
                evbuffer_remove(c->in, c->body.p + c->body.len, n);
                c->body.len += n;
                c->left -= (int64_t)n;
            }
            if (c->left > 0) {
                return P_MORE;
            }
            c->ps = PS_DONE;
            break;
        }
        case PS_CHUNK_SIZE:
        case PS_CHUNK_CRLF:
        case PS_TRAILER: {
            size_t ln;
            char *line = evbuffer_readln(c->in, &ln, EVBUFFER_EOL_CRLF);
            if (line == NULL) {
                if (avail > 8192) {
                    return P_ERROR;
                }
                return P_MORE;
            }
            if (c->ps == PS_CHUNK_CRLF) {
                free(line);
                if (ln != 0) {
                    return P_ERROR;
                }
                c->ps = PS_CHUNK_SIZE;
                break;
            }
            if (c->ps == PS_TRAILER) {
                free(line);
                if (ln == 0) {
                    c->ps = PS_DONE;
                }
                break;
            }
            size_t k = 0;
            int64_t size = 0;
            while (k < ln && isxdigit((unsigned char)line[k]) && size <= MAX_BODY) {
                int d = line[k] <= '9' ? line[k] - '0' : (line[k] | 0x20) - 'a' + 10;
                size = size * 16 + d;
                k++;
            }
            bool ok = k > 0 && (k == ln || line[k] == ';' || line[k] == ' ' || line[k] == '\t');
            free(line);
            if (!ok) {
                return P_ERROR;
            }
            if (size + (int64_t)c->body.len > MAX_BODY) {
                *err = 413;
                return P_ERROR;
            }
            if (size == 0) {
                c->ps = PS_TRAILER;
            } else {
                c->ps = PS_CHUNK_DATA;
                c->left = size;
            }
            break;
        }
        case PS_CHUNK_DATA: {
            size_t n = avail < (size_t)c->left ? avail : (size_t)c->left;
            if (n) {
                buf_grow(&c->body, n);
                evbuffer_remove(c->in, c->body.p + c->body.len, n);
                c->body.len += n;
                c->left -= (int64_t)n;
            }
            if (c->left > 0) {
                return P_MORE;
            }
            c->ps = PS_CHUNK_CRLF;
            break;
        }
        case PS_DONE:
            return P_DONE;
        }
    }
}

/* A request that cannot be parsed: an error answer, then close. */
static void http_error_close(struct conn *c, int status)
{
    struct req *r = &c->r;
    struct buf *b = &c->f->scratch;

    memset(r, 0, sizeof *r);                    /* nothing of it is trusted */
    r->minor = 1;
    r->x_reset = -1;
    r->after = AFTER_CLOSE;
    r->status = status;
    b->len = 0;
    error_json(c, b);
    answer_body(c, status, "application/json", b, NULL);
    c->rs = RS_IDLE;
    c->closing = CL_LINGER;
    if (!c->f->opt.quiet) {
        fprintf(stderr, "fake%s%s: malformed request -> %d, closing\n",
                c->f->opt.name ? " " : "", c->f->opt.name ? c->f->opt.name : "", status);
    }
}

/* ------------------------------------------------------------ connections */

static enum flush conn_flush(struct conn *c)
{
    while (evbuffer_get_length(c->out) > 0) {
        int n = evbuffer_write(c->out, c->fd);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
                if (!c->wev_on) {
                    event_add(c->wev, NULL);
                    c->wev_on = true;
                }
                return FL_PENDING;
            }
            conn_gone(c);
            return FL_GONE;
        }
        if (n == 0) {
            break;
        }
    }
    if (evbuffer_get_length(c->out) > 0) {
        if (!c->wev_on) {
            event_add(c->wev, NULL);
            c->wev_on = true;
        }
        return FL_PENDING;
    }
    if (c->wev_on) {
        event_del(c->wev);
        c->wev_on = false;
    }
    return FL_DRAINED;
}

static void conn_free(struct conn *c)
{
    event_free(c->rev);
    event_free(c->wev);
    event_free(c->tev);
    evbuffer_free(c->in);
    evbuffer_free(c->out);
    buf_free(&c->head);
    buf_free(&c->body);
    buf_free(&c->model);
    buf_free(&c->content);
    buf_free(&c->reasoning);
    buf_free(&c->prefix);
    buf_free(&c->errmsg);
    buf_free(&c->tool_name);
    free(c->bounds);
    free(c);
}

static void reaper_cb(evutil_socket_t fd, short what, void *arg)
{
    struct fake *f = arg;
    (void)fd;
    (void)what;
    while (f->dead) {
        struct conn *c = f->dead;
        f->dead = c->next_dead;
        conn_free(c);
    }
}

/* Closes the socket now (RST when asked); the memory is freed later by the
 * reaper, so callers up the stack may still look at C->dead. */
static void conn_close(struct conn *c, bool rst)
{
    struct fake *f = c->f;
    if (c->dead) {
        return;
    }
    c->dead = true;
    event_del(c->rev);
    event_del(c->wev);
    event_del(c->tev);
    if (rst) {
        struct linger lg = { 1, 0 };
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(c->fd);
    c->fd = -1;
    if (c->prev) {
        c->prev->next = c->next;
    } else {
        f->conns = c->next;
    }
    if (c->next) {
        c->next->prev = c->prev;
    }
    f->nconns--;
    c->next_dead = f->dead;
    f->dead = c;
    event_active(f->reaper, EV_READ, 0);
}

/* The client went away (EOF or an error): end the active request as
 * client_closed and close. */
static void conn_gone(struct conn *c)
{
    if (c->dead) {
        return;
    }
    if (c->rs != RS_IDLE) {
        req_end(c, true);
    }
    conn_close(c, false);
}

/* After a finished answer that closes the connection. */
static void conn_closing_step(struct conn *c)
{
    if (c->closing == CL_LINGER) {
        if (!c->shut) {
            shutdown(c->fd, SHUT_WR);
            c->shut = true;
            evbuffer_drain(c->in, evbuffer_get_length(c->in));
            conn_timer(c, TK_LINGER, LINGER_MS);
        }
        return;
    }
    int queued = 0;
    if (ioctl(c->fd, SIOCOUTQ, &queued) < 0 || queued <= 0 || now_ms() - c->t_rst >= RST_WAIT_MS) {
        conn_close(c, true);
        return;
    }
    conn_timer(c, TK_RST, 1);
}

/* Moves C forward as far as it can go without waiting. */
static void conn_step(struct conn *c)
{
    for (;;) {
        if (c->dead) {
            return;
        }
        if (evbuffer_get_length(c->out) > 0 && conn_flush(c) != FL_DRAINED) {
            return;
        }
        switch (c->rs) {
        case RS_STREAM:
            if (c->r.wait_timer) {
                return;
            }
            stream_pump(c);
            continue;
        case RS_FLUSHING: {
            enum after a = c->r.after;
            req_end(c, false);
            if (a == AFTER_CLOSE && c->closing == CL_NONE) {
                c->closing = CL_LINGER;
            } else if (a == AFTER_RST) {
                c->closing = CL_RST;
                c->t_rst = now_ms();
            }
            continue;
        }
        case RS_NEVER:
        case RS_HELD:
        case RS_DELAY:
        case RS_KEEPALIVE:
            return;
        case RS_IDLE:
            break;
        }
        if (c->closing != CL_NONE) {
            conn_closing_step(c);
            return;
        }
        int err = 400;
        enum presult pr = conn_parse(c, &err);
        if (pr == P_MORE) {
            if (evbuffer_get_length(c->out) > 0) {
                conn_flush(c);
            }
            return;
        }
        if (pr == P_ERROR) {
            http_error_close(c, err);
            continue;
        }
        req_dispatch(c);
    }
}

static void conn_read_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    struct evbuffer_iovec v[2];
    struct iovec iov[2];
    (void)what;

    int nv = evbuffer_reserve_space(c->in, READ_CHUNK, v, 2);
    if (nv <= 0) {
        conn_gone(c);
        return;
    }
    for (int i = 0; i < nv; i++) {
        iov[i].iov_base = v[i].iov_base;
        iov[i].iov_len = v[i].iov_len;
    }
    ssize_t n = readv(fd, iov, nv);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        return;
    }
    if (n <= 0) {
        conn_gone(c);
        return;
    }
    size_t left = (size_t)n;
    int used = 0;
    for (int i = 0; i < nv && left > 0; i++) {
        if (v[i].iov_len > left) {
            v[i].iov_len = left;
        }
        left -= v[i].iov_len;
        used++;
    }
    evbuffer_commit_space(c->in, v, used);

    if (c->closing != CL_NONE) {
        evbuffer_drain(c->in, evbuffer_get_length(c->in));
        return;
    }
    if (c->rs == RS_IDLE) {
        conn_step(c);
    } else if (evbuffer_get_length(c->in) > (size_t)MAX_PENDING) {
        if (!c->f->opt.quiet) {
            fprintf(stderr, "fake: too much pipelined input, closing\n");
        }
        conn_gone(c);
    }
}

static void conn_write_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    (void)fd;
    (void)what;
    if (conn_flush(c) == FL_DRAINED) {
        conn_step(c);
    }
}

static void conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    (void)fd;
    (void)what;
    switch (c->tk) {
    case TK_TICK:
        if (c->rs == RS_DELAY) {
            int64_t early = c->r.deadline - now_ms();
            if (early > 0) {
                conn_timer(c, TK_TICK, early);
                return;
            }
            answer_now(c);
        } else if (c->rs == RS_KEEPALIVE) {
            keepalive_tick(c);
        } else if (c->rs == RS_HELD) {
            hold_tick(c);
        }
        break;
    case TK_EVENT:
        c->r.wait_timer = false;
        break;
    case TK_LINGER:
        conn_close(c, false);
        return;
    case TK_RST:
        break;
    }
    conn_step(c);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
                      int salen, void *arg)
{
    struct fake *f = arg;
    (void)l;
    (void)sa;
    (void)salen;

    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        close(fd);
        return;
    }
    c->f = f;
    c->fd = fd;
    c->in = evbuffer_new();
    c->out = evbuffer_new();
    c->rev = event_new(f->base, fd, EV_READ | EV_PERSIST, conn_read_cb, c);
    c->wev = event_new(f->base, fd, EV_WRITE | EV_PERSIST, conn_write_cb, c);
    c->tev = evtimer_new(f->base, conn_timer_cb, c);
    if (!c->in || !c->out || !c->rev || !c->wev || !c->tev) {
        fprintf(stderr, "fake: out of memory for a connection\n");
        close(fd);
        if (c->rev) event_free(c->rev);
        if (c->wev) event_free(c->wev);
        if (c->tev) event_free(c->tev);
        if (c->in) evbuffer_free(c->in);
        if (c->out) evbuffer_free(c->out);
        free(c);
        return;
    }
    c->next = f->conns;
    if (f->conns) {
        f->conns->prev = c;
    }
    f->conns = c;
    f->nconns++;
    f->st.conns_total++;
    event_add(c->rev, NULL);
}

static void relisten_cb(evutil_socket_t fd, short what, void *arg)
{
    struct fake *f = arg;
    (void)fd;
    (void)what;
    evconnlistener_enable(f->listener);
}

/* accept() failed (e.g. out of descriptors): pause for a moment rather
 * than spin. */
static void accept_error_cb(struct evconnlistener *l, void *arg)
{
    struct fake *f = arg;
    int e = EVUTIL_SOCKET_ERROR();
    fprintf(stderr, "fake: accept: %s\n", evutil_socket_error_to_string(e));
    evconnlistener_disable(l);
    struct timeval tv = { 0, 100 * 1000 };
    evtimer_add(f->relisten, &tv);
}

/* ------------------------------------------------------------ main */

static void flush_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    fflush(stderr);
}

static void signal_cb(evutil_socket_t sig, short what, void *arg)
{
    struct fake *f = arg;
    (void)sig;
    (void)what;
    event_base_loopbreak(f->base);
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: fake_upstream [--port N] [--host 127.0.0.1] [--capacity N] [--fail-rate F]\n"
            "                     [--latency-ms N] [--seed N] [--name NAME] [--status N]\n"
            "                     [--retry-after S] [--hold] [--hold-keepalive-ms N]\n"
            "                     [--hold-max-ms N] [--account-limit N] [--fail-next N]\n"
            "                     [--fail-status N] [--anthropic-done] [--quiet]\n"
            "A fake DeepSeek API for tests; see tests/fake/README.md.\n");
}

static bool header_safe(const char *s)
{
    for (; *s; s++) {
        if ((unsigned char)*s < 0x20 || *s == 0x7f) {
            return false;
        }
    }
    return true;
}

enum { OPT_HOLD = 256, OPT_HOLD_KA, OPT_HOLD_MAX, OPT_ACCOUNT, OPT_FAIL_NEXT, OPT_FAIL_STATUS,
       OPT_ANTH_DONE };

static int opts_parse(int argc, char **argv, struct opts *o)
{
    static const struct option longopts[] = {
        { "port", required_argument, NULL, 'p' },
        { "host", required_argument, NULL, 'H' },
        { "capacity", required_argument, NULL, 'c' },
        { "fail-rate", required_argument, NULL, 'f' },
        { "latency-ms", required_argument, NULL, 'l' },
        { "seed", required_argument, NULL, 's' },
        { "name", required_argument, NULL, 'n' },
        { "status", required_argument, NULL, 'S' },
        { "retry-after", required_argument, NULL, 'r' },
        { "quiet", no_argument, NULL, 'q' },
        { "hold", no_argument, NULL, OPT_HOLD },
        { "hold-keepalive-ms", required_argument, NULL, OPT_HOLD_KA },
        { "hold-max-ms", required_argument, NULL, OPT_HOLD_MAX },
        { "account-limit", required_argument, NULL, OPT_ACCOUNT },
        { "fail-next", required_argument, NULL, OPT_FAIL_NEXT },
        { "fail-status", required_argument, NULL, OPT_FAIL_STATUS },
        { "anthropic-done", no_argument, NULL, OPT_ANTH_DONE },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int ch;

    o->host = "127.0.0.1";
    o->seed = 1;
    o->hold_ka_ms = 1000;
    o->hold_max_ms = 600000;
    o->fail_status = 503;
    while ((ch = getopt_long(argc, argv, "p:H:c:f:l:s:n:S:r:qh", longopts, NULL)) != -1) {
        char *end = NULL;
        errno = 0;
        switch (ch) {
        case 'p': {
            long v = strtol(optarg, &end, 10);
            if (*optarg == 0 || *end || errno || v < 0 || v > 65535) {
                fprintf(stderr, "fake_upstream: --port: bad value \"%s\"\n", optarg);
                return -1;
            }
            o->port = (int)v;
            break;
        }
        case 'H':
            o->host = optarg;
            break;
        case 'c':
            o->capacity = strtol(optarg, &end, 10);
            if (*optarg == 0 || *end || errno || o->capacity < 0) {
                fprintf(stderr, "fake_upstream: --capacity: bad value \"%s\"\n", optarg);
                return -1;
            }
            break;
        case 'f':
            o->fail_rate = strtod(optarg, &end);
            if (*optarg == 0 || *end || errno || !(o->fail_rate >= 0 && o->fail_rate <= 1)) {
                fprintf(stderr, "fake_upstream: --fail-rate: want 0..1, got \"%s\"\n", optarg);
                return -1;
            }
            break;
        case 'l':
            o->latency_ms = strtol(optarg, &end, 10);
            if (*optarg == 0 || *end || errno || o->latency_ms < 0 || o->latency_ms > MAX_MS) {
                fprintf(stderr, "fake_upstream: --latency-ms: bad value \"%s\"\n", optarg);
                return -1;
            }
            break;
        case 's':
            o->seed = strtoull(optarg, &end, 10);
            if (*optarg == 0 || *end || errno) {
                fprintf(stderr, "fake_upstream: --seed: bad value \"%s\"\n", optarg);
                return -1;
            }
            break;
        case 'n':
            if (!header_safe(optarg)) {
                fprintf(stderr, "fake_upstream: --name: control characters\n");
                return -1;
            }
            o->name = optarg;
            break;
        case 'S': {
            long v = strtol(optarg, &end, 10);
            if (*optarg == 0 || *end || errno || v < 200 || v > 599) {
                fprintf(stderr, "fake_upstream: --status: want 200..599, got \"%s\"\n", optarg);
                return -1;
            }
            o->status = (int)v;
            break;
        }
        case 'r':
            if (!header_safe(optarg) || *optarg == 0) {
                fprintf(stderr, "fake_upstream: --retry-after: bad value\n");
                return -1;
            }
            o->retry_after = optarg;
            break;
        case 'q':
            o->quiet = true;
            break;
        case OPT_HOLD:
            o->hold = true;
            break;
        case OPT_ANTH_DONE:
            o->anthropic_done = true;
            break;
        case OPT_FAIL_NEXT:
        case OPT_FAIL_STATUS: {
            long v = strtol(optarg, &end, 10);
            long min = ch == OPT_FAIL_NEXT ? 0 : 200, max = ch == OPT_FAIL_NEXT ? LONG_MAX : 599;
            if (*optarg == 0 || *end || errno || v < min || v > max) {
                fprintf(stderr, "fake_upstream: --%s: bad value \"%s\"\n",
                        ch == OPT_FAIL_NEXT ? "fail-next" : "fail-status", optarg);
                return -1;
            }
            *(ch == OPT_FAIL_NEXT ? &o->fail_next : &o->fail_status) = v;
            break;
        }
        case OPT_HOLD_KA:
        case OPT_HOLD_MAX:
        case OPT_ACCOUNT: {
            long v = strtol(optarg, &end, 10);
            long min = ch == OPT_HOLD_KA ? 1 : 0, max = ch == OPT_ACCOUNT ? LONG_MAX : MAX_MS;
            if (*optarg == 0 || *end || errno || v < min || v > max) {
                fprintf(stderr, "fake_upstream: --%s: bad value \"%s\"\n",
                        ch == OPT_HOLD_KA ? "hold-keepalive-ms"
                        : ch == OPT_HOLD_MAX ? "hold-max-ms" : "account-limit", optarg);
                return -1;
            }
            *(ch == OPT_HOLD_KA ? &o->hold_ka_ms : ch == OPT_HOLD_MAX ? &o->hold_max_ms
                                                 : &o->account_limit) = v;
            break;
        }
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "fake_upstream: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return -1;
    }
    return 0;
}

static int fake_listen(struct fake *f)
{
    struct addrinfo hints, *ai = NULL;
    char port[16];
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    snprintf(port, sizeof port, "%d", f->opt.port);
    int rc = getaddrinfo(f->opt.host, port, &hints, &ai);
    if (rc != 0) {
        fprintf(stderr, "fake_upstream: %s: %s\n", f->opt.host, gai_strerror(rc));
        return -1;
    }
    f->listener = evconnlistener_new_bind(f->base, accept_cb, f,
                                          LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE |
                                              LEV_OPT_CLOSE_ON_EXEC,
                                          4096, ai->ai_addr, (int)ai->ai_addrlen);
    freeaddrinfo(ai);
    if (f->listener == NULL) {
        fprintf(stderr, "fake_upstream: cannot listen on %s:%d: %s\n", f->opt.host, f->opt.port,
                strerror(errno));
        return -1;
    }
    evconnlistener_set_error_cb(f->listener, accept_error_cb);

    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(evconnlistener_get_fd(f->listener), (struct sockaddr *)&ss, &sl) < 0) {
        fprintf(stderr, "fake_upstream: getsockname: %s\n", strerror(errno));
        return -1;
    }
    return ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);
}

int main(int argc, char **argv)
{
    static struct fake fake;
    static char errbuf[1 << 16];
    struct fake *f = &fake;

    if (opts_parse(argc, argv, &f->opt) < 0) {
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stderr, errbuf, _IOFBF, sizeof errbuf);
    f->rng = f->opt.seed;
    f->rng = splitmix64(&f->rng);               /* nearby seeds, unrelated streams */

    f->base = event_base_new();
    if (f->base == NULL) {
        fprintf(stderr, "fake_upstream: event_base_new failed\n");
        return 1;
    }
    f->reaper = event_new(f->base, -1, 0, reaper_cb, f);
    f->admitter = event_new(f->base, -1, 0, admit_cb, f);
    f->relisten = evtimer_new(f->base, relisten_cb, f);
    f->flusher = event_new(f->base, -1, EV_PERSIST, flush_cb, f);
    struct event *sigterm = evsignal_new(f->base, SIGTERM, signal_cb, f);
    struct event *sigint = evsignal_new(f->base, SIGINT, signal_cb, f);
    if (!f->reaper || !f->admitter || !f->relisten || !f->flusher || !sigterm || !sigint) {
        fprintf(stderr, "fake_upstream: cannot create events\n");
        return 1;
    }
    event_add(sigterm, NULL);
    event_add(sigint, NULL);
    struct timeval flush_tv = { 0, 100 * 1000 };
    event_add(f->flusher, &flush_tv);

    int port = fake_listen(f);
    if (port < 0) {
        fflush(stderr);
        return 1;
    }
    printf("READY %d\n", port);
    fflush(stdout);

    event_base_dispatch(f->base);

    while (f->conns) {
        conn_close(f->conns, false);
    }
    reaper_cb(-1, 0, f);
    evconnlistener_free(f->listener);
    event_free(sigterm);
    event_free(sigint);
    event_free(f->reaper);
    event_free(f->admitter);
    event_free(f->relisten);
    event_free(f->flusher);
    event_base_free(f->base);
    log_clear(f);
    buf_free(&f->scratch);
    buf_free(&f->hbuf);
    fflush(stderr);
    return 0;
}
