/*
 * retry: backoff, Retry-After and the retry budget (see retry.h).
 */
#include "retry.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

double
retry_random(void)
{
    static unsigned short seed[3];
    static bool seeded;

    if (!seeded) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        seed[0] = (unsigned short)ts.tv_nsec;
        seed[1] = (unsigned short)(ts.tv_nsec >> 16);
        seed[2] = (unsigned short)getpid();
        seeded = true;
    }
    return erand48(seed);
}

static int64_t
exp_ceiling(int64_t base_ms, int64_t cap_ms, int n)
{
    int64_t t = base_ms;

    for (int i = 0; i < n && t < cap_ms; i++) {
        t *= 2;
    }
    return t < cap_ms ? t : cap_ms;
}

int64_t
retry_backoff_ms(enum jitter j, int64_t base_ms, int64_t cap_ms, int n, int64_t prev_ms,
                 double (*rnd)(void))
{
    int64_t t = exp_ceiling(base_ms, cap_ms, n);

    switch (j) {
    case JITTER_FULL:
        return (int64_t)(rnd() * (double)t);
    case JITTER_EQUAL:
        return t / 2 + (int64_t)(rnd() * (double)(t - t / 2));
    case JITTER_DECORRELATED: {
        int64_t hi = (prev_ms > 0 ? prev_ms : base_ms) * 3;
        int64_t v = base_ms + (int64_t)(rnd() * (double)(hi > base_ms ? hi - base_ms : 0));
        return v < cap_ms ? v : cap_ms;
    }
    case JITTER_NONE:
        return t;
    }
    return t;
}

int64_t
retry_after_ms(const char *value, time_t now)
{
    if (!value) {
        return -1;
    }
    while (*value == ' ' || *value == '\t') {
        value++;
    }
    if (isdigit((unsigned char)*value)) {
        size_t n = strspn(value, "0123456789");
        const char *rest = value + n;
        while (*rest == ' ' || *rest == '\t') {
            rest++;
        }
        if (*rest || n > 9) {
            return -1;
        }
        return strtoll(value, NULL, 10) * 1000;
    }
    static const char *const fmts[] = {
        "%a, %d %b %Y %H:%M:%S GMT", /* IMF-fixdate */
        "%A, %d-%b-%y %H:%M:%S GMT", /* RFC 850 */
        "%a %b %e %H:%M:%S %Y",      /* asctime */
    };
    for (size_t i = 0; i < sizeof(fmts) / sizeof(fmts[0]); i++) {
        struct tm tm;
        memset(&tm, 0, sizeof(tm));
        const char *end = strptime(value, fmts[i], &tm);
        if (!end) {
            continue;
        }
        while (*end == ' ' || *end == '\t') {
            end++;
        }
        if (*end) {
            continue;
        }
        time_t t = timegm(&tm);
        if (t == (time_t)-1) {
            return -1;
        }
        return t > now ? (int64_t)(t - now) * 1000 : 0;
    }
    return -1;
}

bool
retry_on_status(const struct conf *c, int status)
{
    for (size_t i = 0; i < c->retry.non_status; i++) {
        if (c->retry.on_status[i] == status) {
            return true;
        }
    }
    return false;
}

static void
budget_roll(struct retry_budget *b, int64_t now_s)
{
    int i = (int)(now_s % RETRY_WINDOW_S);

    if (b->bucket_s[i] != now_s) {
        b->bucket_s[i] = now_s;
        b->firsts[i] = 0;
        b->retries[i] = 0;
    }
}

void
retry_budget_first(struct retry_budget *b, int64_t now_s)
{
    budget_roll(b, now_s);
    b->firsts[now_s % RETRY_WINDOW_S]++;
}

bool
retry_budget_take(struct retry_budget *b, int64_t now_s, double budget)
{
    uint64_t firsts = 0, retries = 0;

    budget_roll(b, now_s);
    for (int i = 0; i < RETRY_WINDOW_S; i++) {
        if (now_s - b->bucket_s[i] < RETRY_WINDOW_S) {
            firsts += b->firsts[i];
            retries += b->retries[i];
        }
    }
    /* a small floor, so that a quiet gateway can still retry */
    double allowed = budget * (double)firsts;
    double floor = (double)RETRY_FLOOR_PER_S * RETRY_WINDOW_S;
    if (budget > 0 && allowed < floor) {
        allowed = floor;
    }
    if ((double)retries + 1 > allowed) {
        return false;
    }
    b->retries[now_s % RETRY_WINDOW_S]++;
    return true;
}
