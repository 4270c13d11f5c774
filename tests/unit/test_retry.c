/*
 * Unit tests for retry.c: backoff bounds for every jitter mode (fixed random
 * sources and many draws of retry_random), Retry-After parsing (seconds and
 * the three HTTP date forms relative to a fixed now, garbage), retry.on,
 * and the retry budget's 10-second window (ratio, floor, roll-over, budget
 * 0).  Most tests are tables of input -> expected output.  Run from the
 * repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "conf.h"
#include "retry.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))
#define DRAWS    20000

/* An int64 in [LO, HI], with the values in the failure message. */
#define expect_range(v, lo, hi, ...)                                                     \
    do {                                                                                 \
        int64_t v_ = (v), lo_ = (lo), hi_ = (hi);                                        \
        if (v_ < lo_ || v_ > hi_) {                                                      \
            char ctx_[256];                                                              \
            snprintf(ctx_, sizeof(ctx_), __VA_ARGS__);                                   \
            fail_msg("%s: %lld not in [%lld, %lld]", ctx_, (long long)v_, (long long)lo_, \
                     (long long)hi_);                                                    \
        }                                                                                \
    } while (0)

/* ---- random sources --------------------------------------------------- */

static double rnd_zero(void) { return 0.0; }
static double rnd_half(void) { return 0.5; }
static double rnd_almost_one(void) { return 0.9999999999; }

/* A fixed, repeatable sequence spread over [0, 1). */
static unsigned rnd_seq_i;
static double rnd_seq(void)
{
    static const double seq[] = { 0.0, 0.999999, 0.5, 0.25, 0.75, 0.1, 0.9, 0.333, 0.666, 0.01 };
    return seq[rnd_seq_i++ % NELEM(seq)];
}

static double (*const sources[])(void) = {
    rnd_zero, rnd_half, rnd_almost_one, rnd_seq, retry_random,
};
static const char *const source_names[] = {
    "zero", "half", "almost_one", "sequence", "retry_random",
};

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* min(cap, base * 2^n) without overflow. */
static int64_t ceiling(int64_t base, int64_t cap, int n)
{
    int64_t t = base;

    for (int i = 0; i < n; i++) {
        if (t >= cap) {
            return cap;
        }
        t *= 2;
    }
    return min64(t, cap);
}

/* base, cap (ms) pairs and retry numbers that cover the small, the
 * capped and the huge (overflow) cases. */
static const struct { int64_t base, cap; } shapes[] = {
    { 1, 1 }, { 1, 30000 }, { 10, 100 }, { 50, 2000 }, { 1000, 30000 },
    { 1000, 1000 }, { 7, 3600000 }, { 600000, 3600000 },
};
static const int retry_ns[] = { 0, 1, 2, 3, 5, 10, 20, 40, 62, 63, 100, 1000 };

static unsigned ndraws(double (*rnd)(void))
{
    return rnd == retry_random ? DRAWS / 20 : 3;
}

/* ---- backoff ------------------------------------------------------------ */

static void test_backoff_full_bounds(void **state)
{
    (void)state;
    for (size_t s = 0; s < NELEM(sources); s++) {
        for (size_t i = 0; i < NELEM(shapes); i++) {
            for (size_t k = 0; k < NELEM(retry_ns); k++) {
                int n = retry_ns[k];
                int64_t t = ceiling(shapes[i].base, shapes[i].cap, n);
                for (unsigned d = 0; d < ndraws(sources[s]); d++) {
                    int64_t v = retry_backoff_ms(JITTER_FULL, shapes[i].base, shapes[i].cap, n, 0,
                                                 sources[s]);
                    expect_range(v, 0, t, "full %s base=%lld cap=%lld n=%d", source_names[s],
                                 (long long)shapes[i].base, (long long)shapes[i].cap, n);
                }
            }
        }
    }
}

static void test_backoff_equal_bounds(void **state)
{
    (void)state;
    for (size_t s = 0; s < NELEM(sources); s++) {
        for (size_t i = 0; i < NELEM(shapes); i++) {
            for (size_t k = 0; k < NELEM(retry_ns); k++) {
                int n = retry_ns[k];
                int64_t t = ceiling(shapes[i].base, shapes[i].cap, n);
                for (unsigned d = 0; d < ndraws(sources[s]); d++) {
                    int64_t v = retry_backoff_ms(JITTER_EQUAL, shapes[i].base, shapes[i].cap, n,
                                                 0, sources[s]);
                    expect_range(v, t / 2, t, "equal %s base=%lld cap=%lld n=%d",
                                 source_names[s], (long long)shapes[i].base,
                                 (long long)shapes[i].cap, n);
                }
            }
        }
    }
}

static void test_backoff_none_exact(void **state)
{
    (void)state;
    for (size_t s = 0; s < NELEM(sources); s++) {
        for (size_t i = 0; i < NELEM(shapes); i++) {
            for (size_t k = 0; k < NELEM(retry_ns); k++) {
                int n = retry_ns[k];
                int64_t t = ceiling(shapes[i].base, shapes[i].cap, n);
                int64_t v = retry_backoff_ms(JITTER_NONE, shapes[i].base, shapes[i].cap, n, 0,
                                             sources[s]);
                expect_range(v, t, t, "none %s base=%lld cap=%lld n=%d", source_names[s],
                             (long long)shapes[i].base, (long long)shapes[i].cap, n);
            }
        }
    }
}

/* Decorrelated: each sleep in [base, min(cap, 3 * prev)] (prev = base the
 * first time), chained over many retries as request.c uses it. */
static void test_backoff_decorrelated_bounds(void **state)
{
    (void)state;
    for (size_t s = 0; s < NELEM(sources); s++) {
        for (size_t i = 0; i < NELEM(shapes); i++) {
            int64_t base = shapes[i].base, cap = shapes[i].cap;
            unsigned chains = sources[s] == retry_random ? 200 : 2;
            for (unsigned c = 0; c < chains; c++) {
                int64_t prev = 0;
                for (int n = 0; n < 30; n++) {
                    int64_t v = retry_backoff_ms(JITTER_DECORRELATED, base, cap, n, prev,
                                                 sources[s]);
                    int64_t hi = min64(cap, max64(base, 3 * (prev > 0 ? prev : base)));
                    expect_range(v, min64(base, cap), hi,
                                 "decorrelated %s base=%lld cap=%lld n=%d prev=%lld",
                                 source_names[s], (long long)base, (long long)cap, n,
                                 (long long)prev);
                    prev = v;
                }
            }
        }
    }
}

/* Exact values with fixed random sources. */
static void test_backoff_fixed_values(void **state)
{
    static const struct {
        enum jitter j;
        int64_t base, cap;
        int n;
        int64_t prev;
        double (*rnd)(void);
        int64_t want;
    } cases[] = {
        /* full: rnd * min(cap, base * 2^n) */
        { JITTER_FULL, 1000, 30000, 0, 0, rnd_zero, 0 },
        { JITTER_FULL, 1000, 30000, 0, 0, rnd_half, 500 },
        { JITTER_FULL, 1000, 30000, 3, 0, rnd_half, 4000 },
        { JITTER_FULL, 1000, 30000, 3, 0, rnd_almost_one, 7999 },
        { JITTER_FULL, 1000, 30000, 5, 0, rnd_half, 15000 },     /* 32 s capped to 30 s */
        { JITTER_FULL, 1000, 30000, 1000, 0, rnd_almost_one, 29999 },
        { JITTER_FULL, 50, 2000, 2, 0, rnd_half, 100 },
        /* equal: t/2 + rnd * (t - t/2) */
        { JITTER_EQUAL, 1000, 30000, 0, 0, rnd_zero, 500 },
        { JITTER_EQUAL, 1000, 30000, 0, 0, rnd_half, 750 },
        { JITTER_EQUAL, 1000, 30000, 2, 0, rnd_almost_one, 3999 },
        { JITTER_EQUAL, 1000, 30000, 9, 0, rnd_zero, 15000 },
        { JITTER_EQUAL, 3, 3, 0, 0, rnd_zero, 1 },
        /* decorrelated: base + rnd * (3 * prev - base), capped */
        { JITTER_DECORRELATED, 1000, 30000, 0, 0, rnd_zero, 1000 },
        { JITTER_DECORRELATED, 1000, 30000, 0, 0, rnd_half, 2000 },
        { JITTER_DECORRELATED, 1000, 30000, 4, 2000, rnd_half, 3500 },
        { JITTER_DECORRELATED, 1000, 30000, 4, 20000, rnd_half, 30000 },   /* 30.5 s capped */
        { JITTER_DECORRELATED, 1000, 30000, 4, 20000, rnd_zero, 1000 },
        /* none: min(cap, base * 2^n) */
        { JITTER_NONE, 1000, 30000, 0, 0, rnd_half, 1000 },
        { JITTER_NONE, 1000, 30000, 4, 0, rnd_half, 16000 },
        { JITTER_NONE, 1000, 30000, 5, 0, rnd_half, 30000 },
        { JITTER_NONE, 1, 3600000, 63, 0, rnd_half, 3600000 },
        { JITTER_NONE, 10, 100, 1, 0, rnd_zero, 20 },
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        int64_t v = retry_backoff_ms(cases[i].j, cases[i].base, cases[i].cap, cases[i].n,
                                     cases[i].prev, cases[i].rnd);
        expect_range(v, cases[i].want, cases[i].want, "case %zu (jitter %d n=%d)", i,
                     (int)cases[i].j, cases[i].n);
    }
}

/* retry_random draws are in [0, 1) and spread: full jitter with many draws
 * covers both halves and its mean is near t/2. */
static void test_backoff_full_spread(void **state)
{
    double sum = 0, lo = 1, hi = 0;
    int64_t t = 16000;          /* min(30 s, 1 s * 2^4) */
    unsigned low = 0, high = 0;

    (void)state;
    for (unsigned i = 0; i < DRAWS; i++) {
        double r = retry_random();
        assert_true(r >= 0.0 && r < 1.0);
        lo = r < lo ? r : lo;
        hi = r > hi ? r : hi;
        int64_t v = retry_backoff_ms(JITTER_FULL, 1000, 30000, 4, 0, retry_random);
        sum += (double)v;
        if (v < t / 4) {
            low++;
        } else if (v > t - t / 4) {
            high++;
        }
    }
    assert_true(lo < 0.01 && hi > 0.99);
    double mean = sum / DRAWS;
    if (mean < 0.45 * (double)t || mean > 0.55 * (double)t) {
        fail_msg("full jitter mean %.0f, want about %lld", mean, (long long)t / 2);
    }
    assert_true(low > DRAWS / 8 && high > DRAWS / 8);
}

/* ---- Retry-After ---------------------------------------------------------- */

/* Wed, 21 Oct 2015 07:28:00 GMT */
#define NOW ((time_t)1445412480)

static void test_retry_after_table(void **state)
{
    static const struct {
        const char *in;
        int64_t want;
    } cases[] = {
        /* delta-seconds */
        { "0", 0 },
        { "1", 1000 },
        { "120", 120000 },
        { "  7", 7000 },
        { "7  ", 7000 },
        { "\t3\t", 3000 },
        { "007", 7000 },
        { "999999999", 999999999000LL },
        /* IMF-fixdate */
        { "Wed, 21 Oct 2015 07:28:30 GMT", 30000 },
        { "Wed, 21 Oct 2015 07:29:00 GMT", 60000 },
        { "Thu, 22 Oct 2015 07:28:00 GMT", 86400000 },
        { "Wed, 21 Oct 2015 07:28:00 GMT", 0 },     /* now */
        { "Wed, 21 Oct 2015 07:27:59 GMT", 0 },     /* past */
        { "Sun, 06 Nov 1994 08:49:37 GMT", 0 },     /* long past */
        { "Thu, 31 Dec 2015 23:59:59 GMT", (1451606399LL - 1445412480LL) * 1000 },
        /* RFC 850 */
        { "Wednesday, 21-Oct-15 07:28:45 GMT", 45000 },
        { "Wednesday, 21-Oct-15 08:28:00 GMT", 3600000 },
        { "Tuesday, 20-Oct-15 07:28:00 GMT", 0 },
        /* asctime */
        { "Wed Oct 21 07:28:10 2015", 10000 },
        { "Wed Oct 21 07:38:00 2015", 600000 },
        { "Thu Oct  1 07:28:00 2015", 0 },
        { "Sun Nov  6 08:49:37 1994", 0 },
        /* garbage */
        { "", -1 },
        { "   ", -1 },
        { "-1", -1 },
        { "-120", -1 },
        { "+5", -1 },
        { "1.5", -1 },
        { "5s", -1 },
        { "5 s", -1 },
        { "0x10", -1 },
        { "1e3", -1 },
        { "12 34", -1 },
        { "1234567890", -1 },                       /* overlong: more than 9 digits */
        { "99999999999999999999999999", -1 },
        { "soon", -1 },
        { "Wed, 21 Oct 2015", -1 },
        { "Wed, 21 Oct 2015 07:28:30", -1 },
        { "Wed, 21 Oct 2015 07:28:30 GMT trailing", -1 },
        { "Wed, 32 Oct 2015 07:28:30 GMT", -1 },
        { "Wed, 21 Foo 2015 07:28:30 GMT", -1 },
        { "Wed, 21 Oct 2015 25:28:30 GMT", -1 },
        { "2015-10-21T07:28:30Z", -1 },
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        int64_t v = retry_after_ms(cases[i].in, NOW);
        expect_range(v, cases[i].want, cases[i].want, "Retry-After \"%s\"", cases[i].in);
    }
}

static void test_retry_after_null_and_overlong(void **state)
{
    char big[4096];

    (void)state;
    assert_int_equal(retry_after_ms(NULL, NOW), -1);
    memset(big, '9', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    assert_int_equal(retry_after_ms(big, NOW), -1);
    memset(big, 'x', sizeof(big) - 1);
    assert_int_equal(retry_after_ms(big, NOW), -1);
    /* a valid date followed by a long tail */
    snprintf(big, sizeof(big), "Wed, 21 Oct 2015 07:28:30 GMT%03000d", 0);
    assert_int_equal(retry_after_ms(big, NOW), -1);
}

/* The date is read as GMT whatever the local time zone. */
static void test_retry_after_ignores_tz(void **state)
{
    const char *old = getenv("TZ");
    char *saved = old ? strdup(old) : NULL;

    (void)state;
    setenv("TZ", "America/New_York", 1);
    tzset();
    assert_int_equal(retry_after_ms("Wed, 21 Oct 2015 07:28:30 GMT", NOW), 30000);
    assert_int_equal(retry_after_ms("Wed Oct 21 07:28:10 2015", NOW), 10000);
    if (saved) {
        setenv("TZ", saved, 1);
        free(saved);
    } else {
        unsetenv("TZ");
    }
    tzset();
}

/* ---- retry.on ------------------------------------------------------------- */

static void test_retry_on_status(void **state)
{
    static const struct {
        int status;
        bool want;
    } defaults[] = {
        { 429, true }, { 500, true }, { 502, true }, { 503, true }, { 504, true }, { 529, true },
        { 200, false }, { 400, false }, { 401, false }, { 402, false }, { 403, false },
        { 404, false }, { 422, false }, { 501, false }, { 505, false }, { 0, false },
    };
    static const char yaml[] = "retry:\n  on: [503, connect]\n";
    struct conf *c = conf_defaults();
    char *err = NULL;

    (void)state;
    assert_non_null(c);
    for (size_t i = 0; i < NELEM(defaults); i++) {
        if (retry_on_status(c, defaults[i].status) != defaults[i].want) {
            fail_msg("defaults: status %d: want %d", defaults[i].status, defaults[i].want);
        }
    }
    conf_free(c);

    c = conf_parse("t.yaml", yaml, strlen(yaml), &err);
    if (!c) {
        fail_msg("conf_parse: %s", err ? err : "?");
    }
    assert_true(retry_on_status(c, 503));
    assert_false(retry_on_status(c, 429));
    assert_false(retry_on_status(c, 502));
    assert_true(c->retry.on_connect);
    assert_false(c->retry.on_timeout);
    conf_free(c);
    free(err);
}

/* ---- budget --------------------------------------------------------------- */

#define T0 ((int64_t)1700000000)    /* an ordinary second, not 0 */

/* Take retries at second NOW until refused; how many went. */
static unsigned take_all(struct retry_budget *b, int64_t now, double budget, unsigned limit)
{
    unsigned n = 0;

    while (n < limit && retry_budget_take(b, now, budget)) {
        n++;
    }
    return n;
}

/* allowed = max(budget * firsts, 10/s * 10 s) when budget > 0, else 0. */
static void test_budget_ratio_and_floor(void **state)
{
    static const struct {
        double budget;
        unsigned firsts;
        unsigned want;
    } cases[] = {
        { 0.0, 0, 0 },
        { 0.0, 1000, 0 },
        { 0.0, 100000, 0 },
        { 0.1, 0, 100 },          /* the floor: 10/s over 10 s */
        { 0.1, 150, 100 },
        { 0.1, 1000, 100 },
        { 0.1, 2000, 200 },
        { 0.5, 0, 100 },
        { 0.5, 150, 100 },
        { 0.5, 1000, 500 },
        { 0.25, 4000, 1000 },
        { 1.0, 150, 150 },
        { 2.0, 100, 200 },
        { 10.0, 50, 500 },
        { 0.001, 1, 100 },
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        struct retry_budget b;
        memset(&b, 0, sizeof(b));
        for (unsigned f = 0; f < cases[i].firsts; f++) {
            retry_budget_first(&b, T0);
        }
        unsigned got = take_all(&b, T0, cases[i].budget, 1000000);
        if (got != cases[i].want) {
            fail_msg("budget %.3f firsts %u: %u retries allowed, want %u", cases[i].budget,
                     cases[i].firsts, got, cases[i].want);
        }
        /* refused stays refused within the second */
        assert_false(retry_budget_take(&b, T0, cases[i].budget));
    }
}

/* Counts older than 10 s no longer count: retries come back after the
 * window, and first attempts stop lifting the allowance above the floor. */
static void test_budget_window_rollover(void **state)
{
    struct retry_budget b;

    (void)state;
    memset(&b, 0, sizeof(b));
    assert_int_equal(take_all(&b, T0, 0.5, 100000), 100);
    for (int s = 1; s < RETRY_WINDOW_S; s++) {
        if (retry_budget_take(&b, T0 + s, 0.5)) {
            fail_msg("retry allowed %d s after the window filled", s);
        }
    }
    /* T0's bucket leaves the window at T0 + 10 */
    assert_int_equal(take_all(&b, T0 + RETRY_WINDOW_S, 0.5, 100000), 100);
    assert_false(retry_budget_take(&b, T0 + RETRY_WINDOW_S + 9, 0.5));
    assert_int_equal(take_all(&b, T0 + 2 * RETRY_WINDOW_S, 0.5, 100000), 100);

    /* first attempts: 1000 at T0 allow 500 retries (0.5) until T0 + 9 ... */
    memset(&b, 0, sizeof(b));
    for (int i = 0; i < 1000; i++) {
        retry_budget_first(&b, T0);
    }
    assert_int_equal(take_all(&b, T0 + 9, 0.5, 100000), 500);
    /* ... at T0 + 10 the firsts are gone but T0+9's 500 retries still
     * count (over the floor of 100): none; at T0 + 19 they are gone too */
    assert_int_equal(take_all(&b, T0 + 10, 0.5, 100000), 0);
    assert_int_equal(take_all(&b, T0 + 19, 0.5, 100000), 100);

    /* a gap of many windows: nothing stale survives */
    memset(&b, 0, sizeof(b));
    for (int i = 0; i < 1000; i++) {
        retry_budget_first(&b, T0);
    }
    assert_int_equal(take_all(&b, T0 + 1000, 0.5, 100000), 100);
}

/* The window slides second by second: firsts spread over 10 s all count,
 * and each second that leaves takes its own counts with it. */
static void test_budget_sliding(void **state)
{
    struct retry_budget b;

    (void)state;
    memset(&b, 0, sizeof(b));
    /* 100 firsts in each of 10 seconds: 1000 in the window at T0+9 */
    for (int s = 0; s < 10; s++) {
        for (int i = 0; i < 100; i++) {
            retry_budget_first(&b, T0 + s);
        }
    }
    assert_int_equal(take_all(&b, T0 + 9, 1.0, 100000), 1000);
    /* T0+10: second T0 left: 900 firsts, the 1000 retries of T0+9 still count */
    assert_false(retry_budget_take(&b, T0 + 10, 1.0));
    /* T0+19: only T0+10..T0+19 count: no firsts, no retries: the floor */
    assert_int_equal(take_all(&b, T0 + 19, 1.0, 100000), 100);

    /* retries spread: at most the allowance in any 10 s window */
    memset(&b, 0, sizeof(b));
    unsigned total = 0;
    for (int s = 0; s < 10; s++) {
        total += take_all(&b, T0 + s, 0.5, 15);
    }
    assert_int_equal(total, 100);       /* 15 a second until the floor is used up */
    assert_int_equal(take_all(&b, T0 + 10, 0.5, 100000), 15);   /* T0's 15 left */
}

/* Same bucket index, ten seconds apart: the old counts are replaced. */
static void test_budget_bucket_reuse(void **state)
{
    struct retry_budget b;

    (void)state;
    memset(&b, 0, sizeof(b));
    for (int i = 0; i < 5000; i++) {
        retry_budget_first(&b, T0);
    }
    retry_budget_first(&b, T0 + RETRY_WINDOW_S);     /* same index as T0 */
    assert_int_equal(b.firsts[T0 % RETRY_WINDOW_S], 1);
    assert_int_equal(b.bucket_s[T0 % RETRY_WINDOW_S], T0 + RETRY_WINDOW_S);
    assert_int_equal(take_all(&b, T0 + RETRY_WINDOW_S, 1.0, 100000), 100);
}

/* Total outage arithmetic of the integration test: 150 requests, budget
 * 0.1, 5 attempts each: at most max(15, 100) retries go. */
static void test_budget_outage(void **state)
{
    struct retry_budget b;
    unsigned retries = 0;

    (void)state;
    memset(&b, 0, sizeof(b));
    for (int r = 0; r < 150; r++) {
        retry_budget_first(&b, T0);
        for (int a = 1; a < 5; a++) {
            if (retry_budget_take(&b, T0, 0.1)) {
                retries++;
            }
        }
    }
    assert_int_equal(retries, 100);
    memset(&b, 0, sizeof(b));
    retries = 0;
    for (int r = 0; r < 150; r++) {
        retry_budget_first(&b, T0);
        for (int a = 1; a < 5; a++) {
            retries += retry_budget_take(&b, T0, 0.0);
        }
    }
    assert_int_equal(retries, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_backoff_full_bounds),
        cmocka_unit_test(test_backoff_equal_bounds),
        cmocka_unit_test(test_backoff_none_exact),
        cmocka_unit_test(test_backoff_decorrelated_bounds),
        cmocka_unit_test(test_backoff_fixed_values),
        cmocka_unit_test(test_backoff_full_spread),
        cmocka_unit_test(test_retry_after_table),
        cmocka_unit_test(test_retry_after_null_and_overlong),
        cmocka_unit_test(test_retry_after_ignores_tz),
        cmocka_unit_test(test_retry_on_status),
        cmocka_unit_test(test_budget_ratio_and_floor),
        cmocka_unit_test(test_budget_window_rollover),
        cmocka_unit_test(test_budget_sliding),
        cmocka_unit_test(test_budget_bucket_reuse),
        cmocka_unit_test(test_budget_outage),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
