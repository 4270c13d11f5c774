/*
 * reply: the X-Cache and X-Dsgate-* headers of an answer.
 */
#include <stdio.h>

#include "reply.h"

size_t
reply_headers(struct http_header *h, const struct reply_info *ri, struct reply_buf *b)
{
    size_t n = 0;

    snprintf(b->attempts, sizeof(b->attempts), "%d", ri->attempts);
    snprintf(b->queue_ms, sizeof(b->queue_ms), "%lld", (long long)ri->queue_ms);
    if (ri->cache) {
        h[n++] = (struct http_header){"X-Cache", ri->cache};
    }
    if (ri->coalesced) {
        h[n++] = (struct http_header){"X-Dsgate-Coalesced", "1"};
    }
    h[n++] = (struct http_header){"X-Dsgate-Attempts", b->attempts};
    h[n++] = (struct http_header){"X-Dsgate-Queue-Ms", b->queue_ms};
    if (ri->upstream) {
        h[n++] = (struct http_header){"X-Dsgate-Upstream", ri->upstream};
    }
    return n;
}
