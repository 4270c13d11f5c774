/*
 * retry: when and how long to wait before trying an upstream again.
 *
 * Backoff with jitter (full, equal, decorrelated, none) between base and
 * cap; Retry-After in seconds or as an HTTP date; and a retry budget: in any
 * 10-second window, retries may be at most `budget` times the first
 * attempts of that window, with a floor of RETRY_FLOOR_PER_S per second so
 * that a quiet gateway can still retry.
 */
#ifndef DSGATE_RETRY_H
#define DSGATE_RETRY_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "conf.h"

#define RETRY_WINDOW_S    10
#define RETRY_FLOOR_PER_S 10

/*
 * Sleep before retry number N (0 for the first retry).  PREV_MS is the
 * previous sleep (decorrelated jitter; 0 the first time).  RND returns a
 * uniform double in [0, 1).
 */
int64_t retry_backoff_ms(enum jitter j, int64_t base_ms, int64_t cap_ms, int n, int64_t prev_ms,
                         double (*rnd)(void));

/*
 * Parse a Retry-After value: delta-seconds or an HTTP date (IMF-fixdate,
 * RFC 850, asctime), relative to NOW.  Returns milliseconds >= 0, or -1
 * when the value is not valid.
 */
int64_t retry_after_ms(const char *value, time_t now);

/* Is STATUS in retry.on? */
bool retry_on_status(const struct conf *c, int status);

struct retry_budget {
    int64_t bucket_s[RETRY_WINDOW_S]; /* the second each bucket counts */
    uint32_t firsts[RETRY_WINDOW_S];
    uint32_t retries[RETRY_WINDOW_S];
};

/* Count a first attempt at second NOW_S. */
void retry_budget_first(struct retry_budget *b, int64_t now_s);
/*
 * May one more retry go at second NOW_S with ratio BUDGET?  If so it is
 * counted and true is returned.
 */
bool retry_budget_take(struct retry_budget *b, int64_t now_s, double budget);

/* Default random source: uniform [0, 1). */
double retry_random(void);

#endif
