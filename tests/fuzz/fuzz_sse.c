/*
 * fuzz_sse: the SSE / plain-body data scanner (sse_scan_feed).
 *
 * The first input byte chooses SSE or plain (bit 7) and a split point in
 * the rest (modulo its length).  Feeding the two pieces must give the same
 * result as one feed: the same "contains data" answer overall and the same
 * final state.  A third run feeds one byte at a time.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
same_state(const struct sse_scan *a, const struct sse_scan *b, const char *how)
{
    if (a->state != b->state || a->seen_data != b->seen_data || a->mid_line != b->mid_line ||
        a->mid_event != b->mid_event || a->sse != b->sse) {
        fprintf(stderr,
                "%s: state differs from a single feed (state %d/%d seen %d/%d mid_line %d/%d "
                "mid_event %d/%d)\n",
                how, a->state, b->state, a->seen_data, b->seen_data, a->mid_line, b->mid_line,
                a->mid_event, b->mid_event);
        abort();
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    bool sse = (data[0] & 0x80) == 0;
    const char *p = (const char *)data + 1;
    size_t n = size - 1;
    size_t cut = n ? data[0] % (n + 1) : 0;

    struct sse_scan one, two, bytes;
    sse_scan_init(&one, sse);
    sse_scan_init(&two, sse);
    sse_scan_init(&bytes, sse);

    bool d1 = sse_scan_feed(&one, p, n);
    bool a = sse_scan_feed(&two, p, cut);
    bool b = sse_scan_feed(&two, p + cut, n - cut);
    if (d1 != (a || b)) {
        fprintf(stderr, "split at %zu of %zu: data %d, pieces %d+%d\n", cut, n, d1, a, b);
        abort();
    }
    same_state(&one, &two, "two pieces");
    bool db = false;
    for (size_t i = 0; i < n; i++) {
        db |= sse_scan_feed(&bytes, p + i, 1);
    }
    if (db != d1) {
        fprintf(stderr, "byte by byte: data %d, single feed %d\n", db, d1);
        abort();
    }
    same_state(&one, &bytes, "byte by byte");
    /* an empty feed changes nothing */
    struct sse_scan before = one;
    if (sse_scan_feed(&one, p, 0)) {
        fprintf(stderr, "an empty feed reports data\n");
        abort();
    }
    same_state(&before, &one, "empty feed");
    /* a plain body has data exactly when it has a non-white byte */
    if (!sse) {
        bool any = false;
        for (size_t i = 0; i < n; i++) {
            any |= !strchr(" \t\r\n", p[i]) || p[i] == '\0';
        }
        if (any != d1) {
            fprintf(stderr, "plain body: data %d, non-white bytes %d\n", d1, any);
            abort();
        }
    }
    return 0;
}
