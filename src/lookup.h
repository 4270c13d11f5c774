/*
 * lookup: how the cache sees a request: its Cache-Control directives, its
 * key (canonical JSON, or the exact bytes of a body too large to parse,
 * scoped by the client's credential unless cache.shared), and whether it
 * may be answered, stored or shared.  The lookup itself runs in
 * request.c's LOOKUP state.
 */
#ifndef DSGATE_LOOKUP_H
#define DSGATE_LOOKUP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct gateway;
struct http_req;
struct request;

/* Cache-Control directives the client may send: no-store, no-cache. */
void lookup_directives(const struct http_req *req, bool *no_store, bool *no_cache);
/* The key of a request by its exact bytes (large bodies are keyed so); 0 or -1. */
int lookup_raw_key(struct gateway *gw, const struct http_req *req, uint8_t key[32]);
/*
 * The cache key of a request whose exact bytes were keyed before (found
 * through a digest of the raw bytes): its body needs no parsing.  True
 * when found.  RAW gets the digest of the exact bytes on the way (*RAW_OK),
 * for lookup_prepare.
 */
bool lookup_known_key(struct gateway *gw, const struct http_req *req, uint8_t key[32],
                      uint8_t raw[32], bool *raw_ok);
/* Does the body ask for a stream ("stream": true at its top level)?  DOC: parsed, or NULL. */
bool lookup_wants_stream(const void *doc, const char *body, size_t len);
/*
 * Set R's cache fields (cacheable, lookup, store_ok, may_join, key,
 * cache_status) from HREQ; DOC: its parsed body or NULL; KNOWN_KEY: its
 * key from lookup_known_key() or lookup_raw_key(), or NULL; RAW_KEY: the
 * digest of its exact bytes when lookup_known_key() computed it, or NULL.
 */
void lookup_prepare(struct request *r, const struct http_req *hreq, const void *doc,
                    const uint8_t *known_key, const uint8_t *raw_key);
/*
 * The credential that scopes HREQ's cache entries, for what else is kept
 * per client (compat.c): malloc'd, or NULL with cache.shared.  -1 when out
 * of memory.
 */
int lookup_scope(const struct gateway *gw, const struct http_req *hreq, char **credential);

#endif
