/*
 * store: the Redis tier of the response cache, through hiredis' async API
 * on the process's libevent loop.
 *
 * Redis may be slow, down, restarting, full or answering garbage: every
 * lookup ends within the configured timeout as a hit or a miss, never as a
 * failed request.  The connection is re-established by itself with backoff.
 * Writes are fire-and-forget with a TTL; their errors are counted.
 */
#ifndef DSGATE_STORE_H
#define DSGATE_STORE_H

#include <stdbool.h>
#include <stdint.h>

#include "cache.h"

struct event_base;
struct store;
struct store_get;

/* E: a referenced entry the callee owns, or NULL (miss, error, timeout). */
typedef void (*store_get_fn)(void *arg, struct cache_entry *e);

/* NULL when URL cannot be used (logged). */
struct store *store_new(struct event_base *base, const char *url, const char *prefix,
                        int64_t timeout_ms);
void store_configure(struct store *s, const char *prefix, int64_t timeout_ms);
void store_free(struct store *s);

/*
 * Look KEY up.  Returns a handle, and FN runs once later from the loop; or
 * NULL when Redis cannot be asked now (a miss, FN does not run).
 */
struct store_get *store_get(struct store *s, const uint8_t key[CACHE_KEY_LEN], store_get_fn fn,
                            void *arg);
/* Forget a lookup: its callback will not run. */
void store_get_cancel(struct store_get *g);

/* Write E with a TTL of TTL_MS (best effort). */
void store_put(struct store *s, const struct cache_entry *e, int64_t ttl_ms);
/*
 * The same for records other than answers, kept in the namespace NS (Redis
 * keys PREFIX NS HEX) in the same encoding: compat.c's remembered reasoning.
 * Their writes are not counted as cache stores.
 */
struct store_get *store_get_ns(struct store *s, const char *ns, const uint8_t key[CACHE_KEY_LEN],
                               store_get_fn fn, void *arg);
void store_put_ns(struct store *s, const char *ns, const struct cache_entry *e, int64_t ttl_ms);
/* The same; FN(ARG, OK) runs once when Redis has answered (or at once if not sent). */
void store_put_then(struct store *s, const struct cache_entry *e, int64_t ttl_ms,
                    void (*fn)(void *arg, bool ok), void *arg);

#endif
