/*
 * fuzz_retry_after: the Retry-After parser on a NUL-terminated copy of the
 * input.  The answer is -1 or a non-negative number of milliseconds; a
 * later "now" never gives a longer wait, and delta-seconds do not depend
 * on "now" at all.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "retry.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    if (!s) {
        return 0;
    }
    memcpy(s, data, size);
    s[size] = '\0';

    const time_t now = 1445412480;          /* Wed, 21 Oct 2015 07:28:00 GMT */
    int64_t a = retry_after_ms(s, now);
    int64_t b = retry_after_ms(s, now + 3600);
    int64_t z = retry_after_ms(s, 0);
    if (a < -1 || b < -1 || z < -1) {
        fprintf(stderr, "retry_after_ms(\"%s\") = %lld / %lld / %lld\n", s, (long long)a,
                (long long)b, (long long)z);
        abort();
    }
    if ((a < 0) != (b < 0) || (a < 0) != (z < 0)) {
        fprintf(stderr, "validity of \"%s\" depends on now: %lld / %lld / %lld\n", s,
                (long long)a, (long long)b, (long long)z);
        abort();
    }
    if (a >= 0 && b > a) {
        fprintf(stderr, "\"%s\": an hour later the wait grew: %lld -> %lld\n", s, (long long)a,
                (long long)b);
        abort();
    }
    if (a >= 0 && a % 1000 != 0) {
        fprintf(stderr, "\"%s\": %lld ms is not whole seconds\n", s, (long long)a);
        abort();
    }
    free(s);
    return 0;
}
