/*
 * lookup: how the cache sees a request (see lookup.h).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "attempt.h"
#include "cache.h"
#include "gateway.h"
#include "http.h"
#include "lookup.h"
#include "request.h"

void
lookup_directives(const struct http_req *hreq, bool *no_store, bool *no_cache)
{
    const char *cc = http_req_header(hreq, "Cache-Control");

    *no_store = *no_cache = false;
    if (!cc) {
        return;
    }
    for (const char *p = cc; *p;) {
        p += strspn(p, ", \t");
        size_t n = strcspn(p, ", \t");
        if (n == 8 && strncasecmp(p, "no-store", 8) == 0) {
            *no_store = true;
        } else if (n == 8 && strncasecmp(p, "no-cache", 8) == 0) {
            *no_cache = true;
        }
        p += n;
    }
}

/*
 * Every credential header the client sent (credential_headers), length-
 * prefixed so no two sets collide: the cache and coalescing scope.  NULL
 * with cache.shared (or out of memory, then nothing is shared: the
 * caller's key fails).  The caller frees it.
 */
static char *
cache_credential(const struct gateway *gw, const struct http_req *hreq, bool *failed)
{
    size_t n = 0;

    *failed = false;
    if (gw->conf->cache.shared) {
        return NULL;
    }
    for (size_t i = 0; i < CREDENTIAL_HEADERS; i++) {
        const char *v = http_req_header(hreq, credential_headers[i]);
        n += 24 + (v ? strlen(v) : 0);
    }
    char *out = malloc(n + 1), *p = out;
    if (!out) {
        *failed = true;
        return NULL;
    }
    for (size_t i = 0; i < CREDENTIAL_HEADERS; i++) {
        const char *v = http_req_header(hreq, credential_headers[i]);
        p += sprintf(p, "%zu:%s;", v ? strlen(v) : (size_t)0, v ? v : "");
    }
    return out;
}

int
lookup_raw_key(struct gateway *gw, const struct http_req *hreq, uint8_t key[CACHE_KEY_LEN])
{
    bool failed;
    char *cred = cache_credential(gw, hreq, &failed);
    int rc = failed ? -1
                    : cache_raw_key(gw->cache_group, hreq->method, hreq->target, hreq->body,
                                    hreq->body_len, cred, key);

    free(cred);
    return rc;
}

bool
lookup_known_key(struct gateway *gw, const struct http_req *hreq, uint8_t key[CACHE_KEY_LEN],
                 uint8_t raw[CACHE_KEY_LEN], bool *raw_ok)
{
    *raw_ok = lookup_raw_key(gw, hreq, raw) == 0;
    return *raw_ok && cache_alias_get(gw->mem, raw, key);
}

void
lookup_prepare(struct request *r, const struct http_req *hreq, const void *doc,
               const uint8_t *known_key, const uint8_t *raw_key)
{
    struct gateway *gw = r->gw;
    bool no_store, no_cache, failed;
    char *cred = cache_credential(gw, hreq, &failed);
    uint8_t raw[CACHE_KEY_LEN];

    lookup_directives(hreq, &no_store, &no_cache);
    r->cacheable = true;
    r->store_ok = !no_store;
    r->lookup = !no_store && !no_cache;
    r->may_join = r->lookup;
    r->cache_status = no_store ? CS_BYPASS : CS_MISS;
    if (r->store_ok && known_key) {
        memcpy(r->key, known_key, CACHE_KEY_LEN); /* these bytes were keyed before */
    } else if (r->store_ok && (failed || !doc ||
                               cache_key(gw->cache_group, r->method, r->target, doc, cred,
                                         r->key) < 0)) {
        r->store_ok = r->lookup = r->may_join = false;
        r->cache_status = CS_BYPASS;
    } else if (r->store_ok && raw_key) {
        cache_alias_put(gw->mem, raw_key, r->key); /* the same bytes again skip the parse */
    } else if (r->store_ok && cache_raw_key(gw->cache_group, r->method, r->target, hreq->body,
                                            hreq->body_len, cred, raw) == 0) {
        cache_alias_put(gw->mem, raw, r->key);
    }
    free(cred);
}

bool
lookup_wants_stream(const void *doc, const char *body, size_t len)
{
    if (doc) {
        return json_is_true(json_object_get(doc, "stream"));
    }
    /*
     * Not parsed (its bytes were keyed before, or it is large): the key
     * "stream" can only appear unescaped as a key; a nested one (a tool's
     * schema) is followed by an object, not by true.
     */
    for (const char *p = body, *end = body + len;
         p && (p = memmem(p, (size_t)(end - p), "\"stream\"", 8)); p += 8) {
        const char *q = p + 8;
        while (q < end && (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')) {
            q++;
        }
        if (q < end && *q == ':') {
            q++;
            while (q < end && (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')) {
                q++;
            }
            if ((size_t)(end - q) >= 4 && memcmp(q, "true", 4) == 0) {
                return true;
            }
        }
    }
    return false;
}

int
lookup_scope(const struct gateway *gw, const struct http_req *hreq, char **credential)
{
    bool failed;

    *credential = cache_credential(gw, hreq, &failed);
    return failed ? -1 : 0;
}
