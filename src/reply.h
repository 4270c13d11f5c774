/*
 * reply: the headers dsgate adds to every answer it proxies, replays or
 * makes itself (X-Cache, X-Dsgate-*), built in one place.
 */
#ifndef DSGATE_REPLY_H
#define DSGATE_REPLY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "http.h"

#define REPLY_MAX_HEADERS 5

struct reply_info {
    int attempts;
    int64_t queue_ms;
    const char *upstream; /* NULL: no X-Dsgate-Upstream */
    const char *cache;    /* "HIT", "MISS", "BYPASS", or NULL: no X-Cache */
    bool coalesced;
};

/* Storage for the numbers the headers point to. */
struct reply_buf {
    char attempts[16];
    char queue_ms[24];
};

/* Append the set to H (room for REPLY_MAX_HEADERS); returns how many. */
size_t reply_headers(struct http_header *h, const struct reply_info *ri, struct reply_buf *b);

#endif
