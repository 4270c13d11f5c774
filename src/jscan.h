/*
 * jscan: is this a well-formed JSON object?  A single pass with no
 * allocation, for requests that need their body checked but not parsed
 * (the cache is off or bypassed, no model routing): RFC 8259 syntax,
 * strict UTF-8, nesting at most JSCAN_MAX_DEPTH.
 */
#ifndef DSGATE_JSCAN_H
#define DSGATE_JSCAN_H

#include <stddef.h>

#define JSCAN_MAX_DEPTH 2048 /* as jansson */

/* 0 when P (N bytes) is one JSON object with optional white space around it;
 * else -1 and *WHAT says what is wrong and *AT where (byte offset). */
int jscan_object(const char *p, size_t n, const char **what, size_t *at);

#endif
