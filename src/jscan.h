/*
 * jscan: is this a well-formed JSON object?  A single pass with no
 * allocation, for requests that need their body checked but not parsed
 * (the cache is off or bypassed, no model routing): RFC 8259 syntax,
 * strict UTF-8, nesting at most JSCAN_MAX_DEPTH.
 */
#ifndef DSGATE_JSCAN_H
#define DSGATE_JSCAN_H

#include <stdbool.h>
#include <stddef.h>

#define JSCAN_MAX_DEPTH 2048 /* as jansson */

/* 0 when P (N bytes) is one JSON object with optional white space around it;
 * else -1 and *WHAT says what is wrong and *AT where (byte offset). */
int jscan_object(const char *p, size_t n, const char **what, size_t *at);

/* Where the top-level member KEY is (names compared after unescaping). */
struct jscan_member {
    unsigned count; /* how often KEY is a top-level member */
    size_t off;     /* its value (of the last one), as bytes of P: a string with its quotes */
    size_t len;
    bool is_string;
};

/*
 * jscan_object that also finds the top-level member KEY (M gets where),
 * in the same pass: what the check accepts and what routing reads come
 * from one parse.
 */
int jscan_object_member(const char *p, size_t n, const char *key, struct jscan_member *m,
                        const char **what, size_t *at);

/*
 * Decode the JSON string token P (N bytes, with its quotes) into OUT
 * (NUL-terminated, CAP bytes).  Its length, or -1 when it does not fit or
 * holds what a C string or every parser cannot agree on (NUL, a lone
 * surrogate).
 */
int jscan_string_decode(const char *p, size_t n, char *out, size_t cap);

#endif
