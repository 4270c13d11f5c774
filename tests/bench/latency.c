/*
 * latency: a concurrency-1 keep-alive HTTP/1.1 client for tests/bench/run.
 *
 * Sends the same raw request (read from a file: head and body, exactly as
 * they go on the wire) W + N times, one after the other, on one TCP
 * connection, and times each from the first byte written to the last byte of
 * the answer read (CLOCK_MONOTONIC).  The first W are warm-up and not
 * counted.  Prints one summary line of percentiles in microseconds; with -o
 * it also writes every sample, one per line, so that the caller can merge
 * rounds.  Run by hand through tests/bench/run, never by make test.
 *
 * With -s (streams) the answer is a text/event-stream: the client notes the
 * arrival time of every event (an event is complete at its blank line), and
 * reports the time to the first event and the gaps between consecutive
 * events.  Events that complete in the same read() get the same time, so
 * coalesced writes show up as gaps near 0.
 *
 *   latency -p PORT -f REQFILE [-n N] [-w W] [-o SAMPLES] [-x SUBSTR] [-s] [-t SECS]
 *
 * -x SUBSTR: every answer head must contain SUBSTR (case-insensitive), e.g.
 * "x-cache: hit"; answers that do not are counted as "mismatch".  Any answer
 * other than 200 is counted as "errors".  A read that waits longer than -t
 * seconds (default 10) ends the run with exit status 1.
 *
 * Output (one line each; values in us):
 *   lat n=N min=.. p50=.. p90=.. p99=.. max=.. mean=.. errors=E mismatch=M
 * and with -s:
 *   ttfe n=N min=.. p50=.. p90=.. p99=.. max=.. mean=.. errors=E mismatch=M
 *   gap n=N min=.. p50=.. p90=.. p99=.. max=.. mean=.. events=K bunched=B
 * (bunched: gaps under 100 us, i.e. events delivered in one read).
 * Sample file lines: "lat US", "ttfe US", "gap US".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

struct samples {
    double *v;
    size_t n, cap;
};

static char rbuf[1 << 20];      /* bytes read and not yet consumed */
static size_t rlen;
static int fd = -1;
static double t_last_read;      /* time of the read that brought the newest bytes */

static double
now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static void
die(const char *what)
{
    fprintf(stderr, "latency: %s%s%s\n", what, errno ? ": " : "", errno ? strerror(errno) : "");
    exit(1);
}

static void
samples_add(struct samples *s, double v)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1024;
        s->v = realloc(s->v, s->cap * sizeof(double));
        if (!s->v) {
            die("out of memory");
        }
    }
    s->v[s->n++] = v;
}

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

/* nearest-rank percentile of sorted values */
static double
pct(const struct samples *s, double p)
{
    size_t k;

    if (s->n == 0) {
        return 0;
    }
    k = (size_t)(p / 100.0 * (double)s->n + 0.999999);
    if (k < 1) {
        k = 1;
    }
    if (k > s->n) {
        k = s->n;
    }
    return s->v[k - 1];
}

static void
summary(const char *name, struct samples *s, FILE *out, const char *extra)
{
    double sum = 0;

    qsort(s->v, s->n, sizeof(double), cmp_double);
    for (size_t i = 0; i < s->n; i++) {
        sum += s->v[i];
    }
    printf("%s n=%zu min=%.1f p50=%.1f p90=%.1f p99=%.1f max=%.1f mean=%.1f %s\n", name, s->n,
           s->n ? s->v[0] : 0, pct(s, 50), pct(s, 90), pct(s, 99), s->n ? s->v[s->n - 1] : 0,
           s->n ? sum / (double)s->n : 0, extra);
    if (out) {
        for (size_t i = 0; i < s->n; i++) {
            fprintf(out, "%s %.1f\n", name, s->v[i]);
        }
    }
}

/* Reads more bytes into rbuf; dies on EOF, error or timeout. */
static void
fill(void)
{
    ssize_t n;

    if (rlen == sizeof(rbuf)) {
        errno = 0;
        die("answer too large");
    }
    do {
        n = read(fd, rbuf + rlen, sizeof(rbuf) - rlen);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        errno = 0;
        die("timed out waiting for the answer");
    }
    if (n < 0) {
        die("read");
    }
    if (n == 0) {
        errno = 0;
        die("server closed the connection");
    }
    t_last_read = now_us();
    rlen += (size_t)n;
}

static void
consume(size_t n)
{
    memmove(rbuf, rbuf + n, rlen - n);
    rlen -= n;
}

/* Offset just past "\r\n" at or after from, reading more as needed. */
static size_t
line_end(size_t from)
{
    for (;;) {
        char *p = rlen > from ? memmem(rbuf + from, rlen - from, "\r\n", 2) : NULL;
        if (p) {
            return (size_t)(p - rbuf) + 2;
        }
        fill();
    }
}

/* Scans newly decoded stream bytes for event ends ("\n\n"); notes times. */
struct sse {
    int state;  /* 0: mid-line, 1: just saw '\n' */
    int any;    /* the current event has content */
    double t0, prev;
    long events;
    struct samples *ttfe, *gap;
};

static void
sse_feed(struct sse *e, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c == '\r') {
            continue;
        }
        if (c == '\n') {
            if (e->state == 1 && e->any) {
                /* blank line: event complete, at the time of the read that carried it */
                if (e->events == 0) {
                    samples_add(e->ttfe, t_last_read - e->t0);
                } else {
                    samples_add(e->gap, t_last_read - e->prev);
                }
                e->prev = t_last_read;
                e->events++;
                e->any = 0;
            }
            e->state = 1;
        } else {
            e->state = 0;
            e->any = 1;
        }
    }
}

static int
head_has(const char *head, size_t len, const char *needle)
{
    size_t nl = strlen(needle);

    for (size_t i = 0; i + nl <= len; i++) {
        if (strncasecmp(head + i, needle, nl) == 0) {
            return 1;
        }
    }
    return 0;
}

/* Reads one answer; returns its status.  Stream events go to e when not NULL. */
static int
read_answer(struct sse *e, const char *expect, int *mismatch)
{
    size_t hend;
    char *p;

    for (;;) {
        p = rlen ? memmem(rbuf, rlen, "\r\n\r\n", 4) : NULL;
        if (p) {
            break;
        }
        fill();
    }
    hend = (size_t)(p - rbuf) + 4;

    int status = 0;
    if (hend > 12 && strncmp(rbuf, "HTTP/1.", 7) == 0) {
        status = atoi(rbuf + 9);
    }
    if (expect && !head_has(rbuf, hend, expect)) {
        (*mismatch)++;
    }
    long clen = -1;
    int chunked = 0;
    for (size_t i = 0; i < hend;) {
        char *eol = memmem(rbuf + i, hend - i, "\r\n", 2);
        if (!eol) {
            break;
        }
        size_t ll = (size_t)(eol - (rbuf + i));
        if (ll > 15 && strncasecmp(rbuf + i, "content-length:", 15) == 0) {
            clen = atol(rbuf + i + 15);
        } else if (ll > 18 && strncasecmp(rbuf + i, "transfer-encoding:", 18) == 0 &&
                   head_has(rbuf + i, ll, "chunked")) {
            chunked = 1;
        }
        i += ll + 2;
    }
    consume(hend);

    if (chunked) {
        for (;;) {
            size_t le = line_end(0);
            long sz = strtol(rbuf, NULL, 16);
            consume(le);
            if (sz == 0) {
                /* trailers until the blank line */
                for (;;) {
                    le = line_end(0);
                    consume(le);
                    if (le == 2) {
                        return status;
                    }
                }
            }
            while (rlen < (size_t)sz + 2) {
                fill();
            }
            if (e) {
                sse_feed(e, rbuf, (size_t)sz);
            }
            consume((size_t)sz + 2);
        }
    }
    if (clen < 0) {
        errno = 0;
        die("answer without Content-Length or chunked (close-delimited is not supported)");
    }
    while (rlen < (size_t)clen) {
        fill();
    }
    if (e) {
        sse_feed(e, rbuf, (size_t)clen);
    }
    consume((size_t)clen);
    return status;
}

static void
write_all(const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            die("write");
        }
        p += w;
        n -= (size_t)w;
    }
}

static void
usage(void)
{
    fprintf(stderr, "usage: latency -p PORT -f REQFILE [-n N] [-w W] [-o SAMPLES] [-x SUBSTR] "
                    "[-s] [-t SECS] [-h 127.0.0.1]\n");
    exit(2);
}

int
main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *reqfile = NULL, *outfile = NULL, *expect = NULL;
    int port = 0, stream = 0, timeout = 10, opt;
    long n = 1000, warm = 100;

    while ((opt = getopt(argc, argv, "h:p:f:n:w:o:x:st:")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'f': reqfile = optarg; break;
        case 'n': n = atol(optarg); break;
        case 'w': warm = atol(optarg); break;
        case 'o': outfile = optarg; break;
        case 'x': expect = optarg; break;
        case 's': stream = 1; break;
        case 't': timeout = atoi(optarg); break;
        default: usage();
        }
    }
    if (!port || !reqfile || n < 0 || warm < 0) {
        usage();
    }

    FILE *f = fopen(reqfile, "rb");
    if (!f) {
        die(reqfile);
    }
    static char req[1 << 16];
    size_t reqlen = fread(req, 1, sizeof(req), f);
    fclose(f);
    if (reqlen == 0) {
        errno = 0;
        die("empty request file");
    }

    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        errno = 0;
        die("bad host");
    }
    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        die("socket");
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct timeval tv = { .tv_sec = timeout };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        die("connect");
    }

    struct samples lat = { 0 }, ttfe = { 0 }, gap = { 0 }, wttfe = { 0 }, wgap = { 0 };
    int errors = 0, mismatch = 0, wmismatch = 0;
    long events = 0;
    for (long i = 0; i < warm + n; i++) {
        int counted = i >= warm;
        struct sse e = { .ttfe = counted ? &ttfe : &wttfe, .gap = counted ? &gap : &wgap };
        double t0 = now_us();
        e.t0 = t0;
        write_all(req, reqlen);
        int status = read_answer(stream ? &e : NULL, expect, counted ? &mismatch : &wmismatch);
        double t1 = now_us();
        if (counted) {
            if (status != 200) {
                errors++;
            }
            samples_add(&lat, t1 - t0);
            events += e.events;
        }
    }
    close(fd);

    FILE *out = NULL;
    if (outfile && !(out = fopen(outfile, "w"))) {
        die(outfile);
    }
    char extra[128];
    snprintf(extra, sizeof(extra), "errors=%d mismatch=%d", errors, mismatch);
    if (stream) {
        summary("ttfe", &ttfe, out, extra);
        long bunched = 0;
        for (size_t i = 0; i < gap.n; i++) {
            bunched += gap.v[i] < 100.0;
        }
        snprintf(extra, sizeof(extra), "events=%ld bunched=%ld", events, bunched);
        summary("gap", &gap, out, extra);
    } else {
        summary("lat", &lat, out, extra);
    }
    if (out) {
        fclose(out);
    }
    return 0;
}
