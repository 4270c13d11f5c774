/*
 * cache: response cache keys, the memory tier (LRU) and the entry format.
 *
 * Key: SHA-256 over the upstream group, method, path, the request body in
 * canonical form (jansson, keys sorted, compact) and, unless cache.shared,
 * a SHA-256 of the client's credential (never the credential itself).
 *
 * An entry is an immutable, reference-counted response: content type,
 * whether it is an SSE stream, the body.  The memory tier is an LRU bounded
 * by entry count and bytes; the Redis tier (store.c) holds the same entry
 * encoded with a format version.
 */
#ifndef DSGATE_CACHE_H
#define DSGATE_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define CACHE_KEY_LEN        32
#define CACHE_FORMAT_VERSION 2

struct cache_entry {
    int refs;
    uint8_t key[CACHE_KEY_LEN];
    int64_t expires_ms; /* wall clock, ms since the epoch */
    bool sse;
    char *ctype;
    char *body;
    size_t body_len;
    /* memory tier links */
    struct cache_entry *hnext;
    struct cache_entry *lru_prev, *lru_next;
    bool in_memory;
};

/*
 * The key.  GROUP names the upstream set, BODY is the parsed request,
 * CREDENTIAL the client's Authorization value (NULL or "" for none, or
 * when the cache is shared).  0 or -1 (body cannot be serialised).
 */
int cache_key(const char *group, const char *method, const char *path, const json_t *body,
              const char *credential, uint8_t out[CACHE_KEY_LEN]);

/*
 * The same over the body's raw bytes: two requests with byte-identical
 * bodies share it.  Used to skip parsing on repeated requests: the memory
 * tier remembers raw key -> key (cache_alias_*).
 */
int cache_raw_key(const char *group, const char *method, const char *path, const char *body,
                  size_t len, const char *credential, uint8_t out[CACHE_KEY_LEN]);

/* Hex form of a key: 64 characters and a NUL. */
/* Bytes the key builders keep between calls (a large body's are given back). */
size_t cache_keybuf_bytes(void);
void cache_key_hex(const uint8_t key[CACHE_KEY_LEN], char out[2 * CACHE_KEY_LEN + 1]);

/* A new entry with one reference; copies CTYPE and BODY.  NULL on OOM. */
struct cache_entry *cache_entry_new(const uint8_t key[CACHE_KEY_LEN], bool sse, const char *ctype,
                                    const char *body, size_t len, int64_t expires_ms);
void cache_entry_ref(struct cache_entry *e);
void cache_entry_unref(struct cache_entry *e);

/*
 * Is a complete 200 response worth storing?  Non-stream: a JSON object
 * without "error" after leading white space (*START skips it).  Stream:
 * SSE that D recognises as whole (OpenAI: its last event is
 * "data: [DONE]"; Anthropic: message_stop); *START skips keep-alive noise
 * before the first event.
 */
struct dialect;
bool cache_storable(const struct dialect *d, bool sse, const char *body, size_t len,
                    size_t *start);

/* Entry encoding for the Redis tier: a versioned binary record. */
char *cache_entry_encode(const struct cache_entry *e, size_t *len);
/*
 * NULL when the record is not a valid current-format entry for KEY: wrong
 * magic, version, key or lengths, a checksum that does not match, or a body
 * that is not the shape of a stored answer.  (The body was validated when
 * it was stored; the checksum stands for that, instead of a second parse.)
 */
struct cache_entry *cache_entry_decode(const uint8_t key[CACHE_KEY_LEN], const char *buf,
                                       size_t len);

struct cache_mem;

/* MAX_ENTRIES 0: the memory tier is off (every get misses, put is a no-op). */
struct cache_mem *cache_mem_new(size_t max_entries, size_t max_bytes);
void cache_mem_configure(struct cache_mem *m, size_t max_entries, size_t max_bytes);
void cache_mem_free(struct cache_mem *m);
/* A referenced entry (caller unrefs) or NULL; expired entries are dropped. */
struct cache_entry *cache_mem_get(struct cache_mem *m, const uint8_t key[CACHE_KEY_LEN],
                                  int64_t now_ms);
/* Insert or replace; the memory tier takes its own reference. */
void cache_mem_put(struct cache_mem *m, struct cache_entry *e);
size_t cache_mem_count(const struct cache_mem *m);
/*
 * Raw key -> key, in a direct-mapped table of twice the hash buckets
 * (at least 2048 slots of 65 bytes; a newer pair replaces an older one in
 * its slot).  Kept even when the memory tier holds no entries, for the
 * Redis tier.
 */
bool cache_alias_get(const struct cache_mem *m, const uint8_t raw[CACHE_KEY_LEN],
                     uint8_t key[CACHE_KEY_LEN]);
void cache_alias_put(struct cache_mem *m, const uint8_t raw[CACHE_KEY_LEN],
                     const uint8_t key[CACHE_KEY_LEN]);
size_t cache_mem_bytes(const struct cache_mem *m);

/* Wall clock in ms. */
int64_t cache_now_ms(void);

#endif
