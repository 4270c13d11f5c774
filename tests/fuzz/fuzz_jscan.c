/*
 * fuzz_jscan: the allocation-free JSON object checker (src/jscan.c),
 * differentially against jansson, which checks the same bodies when the
 * cache is on (server.c): both must say yes or no to the same body, so
 * that whether a request is refused does not depend on the cache settings.
 *
 * Known, reported differences that are let through here: jansson refuses
 * "\u0000" without JSON_ALLOW_NUL, numbers out of its range, and escaped
 * lone surrogates ("\ud800"), all of which RFC 8259's grammar accepts
 * (jansson's error text names them); and jansson 2.14 takes a raw NUL byte
 * right after a number as the end of the number and skips it
 * (`{"a":1\0,"b":2}` loads as {"a":1,"b":2}), where jscan rightly refuses
 * the NUL.
 *
 * The input is copied to a buffer of exactly its size, so that ASan sees
 * any read past the end (the server's body happens to be NUL-terminated,
 * which hides such reads there).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "jscan.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int
known_difference(const char *text)
{
    return strstr(text, "\\u0000") != NULL || strstr(text, "NUL byte") != NULL ||
           strstr(text, "too big") != NULL ||
           strstr(text, "overflow") != NULL || strstr(text, "invalid Unicode") != NULL;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = malloc(size ? size : 1);
    if (!buf) {
        return 0;
    }
    memcpy(buf, data, size);
    const char *what = NULL;
    size_t at = 0;
    int rc = jscan_object(buf, size, &what, &at);
    if (rc != 0 && (what == NULL || at > size)) {
        fprintf(stderr, "jscan: no reason or a position past the end (%zu > %zu)\n", at, size);
        abort();
    }
    json_error_t err;
    json_t *doc = json_loadb(buf, size, 0, &err);
    bool jansson_ok = doc && json_is_object(doc);
    if ((rc == 0) != jansson_ok) {
        bool nul_quirk = rc != 0 && jansson_ok && memchr(buf, '\0', size) != NULL;
        if (!(rc == 0 && !doc && known_difference(err.text)) && !nul_quirk) {
            fprintf(stderr, "jscan says %s (%s at %zu), jansson says %s (%s)\n",
                    rc == 0 ? "valid" : "invalid", rc == 0 ? "-" : what, at,
                    jansson_ok ? "a valid object" : "invalid", doc ? "not an object" : err.text);
            abort();
        }
    }
    json_decref(doc);
    free(buf);
    return 0;
}
