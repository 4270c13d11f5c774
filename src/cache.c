/*
 * cache: keys, entries and the memory LRU (see cache.h).
 *
 * The memory tier is a chained hash table on the key plus a doubly linked
 * LRU list: get moves an entry to the front, put evicts from the back until
 * both bounds hold.  An entry larger than the whole byte bound is not kept.
 *
 * Encoded entry (Redis tier), all integers big-endian:
 *   "DSGC" | version u8 | flags u8 (1: SSE) | expires_ms u64 | key[32] |
 *   ctype_len u16 | ctype | body_len u32 | body
 */
#include "cache.h"

#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <openssl/evp.h>

#define MEM_BUCKETS_MIN 1024
#define MAGIC           "DSGC"
#define HDR_LEN         (4 + 1 + 1 + 8 + CACHE_KEY_LEN + 2)

int64_t
cache_now_ms(void)
{
    struct timeval tv;

    gettimeofday(&tv, NULL);
    return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

/* ---- key -------------------------------------------------------------- */

static void
digest_field(EVP_MD_CTX *md, const char *s, size_t len)
{
    uint8_t n[8];

    /* length-prefixed, so fields cannot run into each other */
    for (int i = 0; i < 8; i++) {
        n[i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
    }
    EVP_DigestUpdate(md, n, sizeof(n));
    EVP_DigestUpdate(md, s, len);
}

int
cache_key(const char *group, const char *method, const char *path, const json_t *body,
          const char *credential, uint8_t out[CACHE_KEY_LEN])
{
    char *canon = json_dumps(body, JSON_SORT_KEYS | JSON_COMPACT | JSON_ENCODE_ANY);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned int olen = 0;
    int rc = -1;

    if (!canon || !md) {
        goto out;
    }
    uint8_t cred[CACHE_KEY_LEN] = {0};
    if (credential && *credential) {
        unsigned int clen = 0;
        EVP_Digest(credential, strlen(credential), cred, &clen, EVP_sha256(), NULL);
    }
    if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        goto out;
    }
    static const char tag[] = "dsgate-cache-v1";
    digest_field(md, tag, sizeof(tag) - 1);
    digest_field(md, group, strlen(group));
    digest_field(md, method, strlen(method));
    digest_field(md, path, strlen(path));
    digest_field(md, canon, strlen(canon));
    digest_field(md, (const char *)cred, credential && *credential ? sizeof(cred) : 0);
    if (EVP_DigestFinal_ex(md, out, &olen) == 1 && olen == CACHE_KEY_LEN) {
        rc = 0;
    }
out:
    EVP_MD_CTX_free(md);
    free(canon);
    return rc;
}

void
cache_key_hex(const uint8_t key[CACHE_KEY_LEN], char out[2 * CACHE_KEY_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";

    for (int i = 0; i < CACHE_KEY_LEN; i++) {
        out[2 * i] = hex[key[i] >> 4];
        out[2 * i + 1] = hex[key[i] & 15];
    }
    out[2 * CACHE_KEY_LEN] = '\0';
}

/* ---- entries ---------------------------------------------------------- */

struct cache_entry *
cache_entry_new(const uint8_t key[CACHE_KEY_LEN], bool sse, const char *ctype, const char *body,
                size_t len, int64_t expires_ms)
{
    struct cache_entry *e = calloc(1, sizeof(*e));

    if (!e) {
        return NULL;
    }
    e->refs = 1;
    memcpy(e->key, key, CACHE_KEY_LEN);
    e->sse = sse;
    e->expires_ms = expires_ms;
    e->ctype = strdup(ctype ? ctype : "");
    e->body = malloc(len + 1);
    if (!e->ctype || !e->body) {
        free(e->ctype);
        free(e->body);
        free(e);
        return NULL;
    }
    memcpy(e->body, body, len);
    e->body[len] = '\0';
    e->body_len = len;
    return e;
}

void
cache_entry_ref(struct cache_entry *e)
{
    e->refs++;
}

void
cache_entry_unref(struct cache_entry *e)
{
    if (e && --e->refs == 0) {
        free(e->ctype);
        free(e->body);
        free(e);
    }
}

static bool
is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

bool
cache_storable(bool sse, const char *body, size_t len, size_t *start)
{
    size_t s = 0;

    if (!sse) {
        while (s < len && is_ws(body[s])) {
            s++;
        }
        json_error_t err;
        json_t *doc = json_loadb(body + s, len - s, 0, &err);
        bool ok = doc && json_is_object(doc) && !json_object_get(doc, "error");
        json_decref(doc);
        *start = s;
        return ok;
    }
    /* skip keep-alive comments and blank lines before the first event */
    while (s < len) {
        if (is_ws(body[s])) {
            s++;
        } else if (body[s] == ':') {
            const char *nl = memchr(body + s, '\n', len - s);
            if (!nl) {
                return false;
            }
            s = (size_t)(nl - body) + 1;
        } else {
            break;
        }
    }
    size_t e = len;
    while (e > s && is_ws(body[e - 1])) {
        e--;
    }
    static const char done[] = "data: [DONE]";
    size_t dl = sizeof(done) - 1;
    if (e - s < dl || memcmp(body + e - dl, done, dl) != 0) {
        return false;
    }
    /* the [DONE] line must start a line */
    if (e - s > dl && body[e - dl - 1] != '\n') {
        return false;
    }
    *start = s;
    return true;
}

static void
put_u(char *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++) {
        p[i] = (char)(uint8_t)(v >> (8 * (bytes - 1 - i)));
    }
}

static uint64_t
get_u(const char *p, int bytes)
{
    uint64_t v = 0;

    for (int i = 0; i < bytes; i++) {
        v = (v << 8) | (uint8_t)p[i];
    }
    return v;
}

char *
cache_entry_encode(const struct cache_entry *e, size_t *len)
{
    size_t cl = strlen(e->ctype);

    if (cl > 0xffff || e->body_len > 0xffffffffu) {
        return NULL;
    }
    size_t n = HDR_LEN + cl + 4 + e->body_len;
    char *buf = malloc(n);
    if (!buf) {
        return NULL;
    }
    char *p = buf;
    memcpy(p, MAGIC, 4);
    p += 4;
    *p++ = CACHE_FORMAT_VERSION;
    *p++ = e->sse ? 1 : 0;
    put_u(p, (uint64_t)e->expires_ms, 8);
    p += 8;
    memcpy(p, e->key, CACHE_KEY_LEN);
    p += CACHE_KEY_LEN;
    put_u(p, cl, 2);
    p += 2;
    memcpy(p, e->ctype, cl);
    p += cl;
    put_u(p, e->body_len, 4);
    p += 4;
    memcpy(p, e->body, e->body_len);
    *len = n;
    return buf;
}

struct cache_entry *
cache_entry_decode(const uint8_t key[CACHE_KEY_LEN], const char *buf, size_t len)
{
    if (len < HDR_LEN + 4 || memcmp(buf, MAGIC, 4) != 0 || buf[4] != CACHE_FORMAT_VERSION ||
        (buf[5] & ~1) != 0) {
        return NULL;
    }
    bool sse = buf[5] & 1;
    int64_t expires = (int64_t)get_u(buf + 6, 8);
    if (memcmp(buf + 14, key, CACHE_KEY_LEN) != 0) {
        return NULL; /* not the entry we asked for */
    }
    size_t cl = (size_t)get_u(buf + 14 + CACHE_KEY_LEN, 2);
    size_t off = HDR_LEN;
    if (cl > len - off - 4) {
        return NULL;
    }
    char ctype[256];
    if (cl >= sizeof(ctype) || memchr(buf + off, '\0', cl) || memchr(buf + off, '\n', cl) ||
        memchr(buf + off, '\r', cl)) {
        return NULL;
    }
    memcpy(ctype, buf + off, cl);
    ctype[cl] = '\0';
    off += cl;
    size_t bl = (size_t)get_u(buf + off, 4);
    off += 4;
    if (bl != len - off) {
        return NULL;
    }
    size_t start;
    if (!cache_storable(sse, buf + off, bl, &start) || start != 0) {
        return NULL;
    }
    return cache_entry_new(key, sse, ctype, buf + off, bl, expires);
}

/* ---- memory tier ------------------------------------------------------ */

struct cache_mem {
    struct cache_entry **buckets;
    size_t nbuckets;
    struct cache_entry *lru_head, *lru_tail; /* head: most recent */
    size_t count, bytes;
    size_t max_entries, max_bytes;
};

static size_t
entry_size(const struct cache_entry *e)
{
    return sizeof(*e) + e->body_len + strlen(e->ctype) + 2;
}

static size_t
bucket_of(const struct cache_mem *m, const uint8_t *key)
{
    uint64_t h;

    memcpy(&h, key, sizeof(h)); /* the key is a hash already */
    return (size_t)(h % m->nbuckets);
}

struct cache_mem *
cache_mem_new(size_t max_entries, size_t max_bytes)
{
    struct cache_mem *m = calloc(1, sizeof(*m));

    if (!m) {
        return NULL;
    }
    m->nbuckets = MEM_BUCKETS_MIN;
    while (m->nbuckets < max_entries && m->nbuckets < (1u << 24)) {
        m->nbuckets *= 2;
    }
    m->buckets = calloc(m->nbuckets, sizeof(*m->buckets));
    if (!m->buckets) {
        free(m);
        return NULL;
    }
    m->max_entries = max_entries;
    m->max_bytes = max_bytes;
    return m;
}

static void
lru_unlink(struct cache_mem *m, struct cache_entry *e)
{
    if (e->lru_prev) {
        e->lru_prev->lru_next = e->lru_next;
    } else {
        m->lru_head = e->lru_next;
    }
    if (e->lru_next) {
        e->lru_next->lru_prev = e->lru_prev;
    } else {
        m->lru_tail = e->lru_prev;
    }
    e->lru_prev = e->lru_next = NULL;
}

static void
lru_push_front(struct cache_mem *m, struct cache_entry *e)
{
    e->lru_prev = NULL;
    e->lru_next = m->lru_head;
    if (m->lru_head) {
        m->lru_head->lru_prev = e;
    } else {
        m->lru_tail = e;
    }
    m->lru_head = e;
}

static void
mem_remove(struct cache_mem *m, struct cache_entry *e)
{
    struct cache_entry **pp = &m->buckets[bucket_of(m, e->key)];

    while (*pp && *pp != e) {
        pp = &(*pp)->hnext;
    }
    if (*pp) {
        *pp = e->hnext;
    }
    e->hnext = NULL;
    lru_unlink(m, e);
    e->in_memory = false;
    m->count--;
    m->bytes -= entry_size(e);
    cache_entry_unref(e);
}

static void
mem_evict(struct cache_mem *m)
{
    while (m->lru_tail && (m->count > m->max_entries || m->bytes > m->max_bytes)) {
        mem_remove(m, m->lru_tail);
    }
}

void
cache_mem_configure(struct cache_mem *m, size_t max_entries, size_t max_bytes)
{
    m->max_entries = max_entries;
    m->max_bytes = max_bytes;
    mem_evict(m);
}

struct cache_entry *
cache_mem_get(struct cache_mem *m, const uint8_t key[CACHE_KEY_LEN], int64_t now_ms)
{
    for (struct cache_entry *e = m->buckets[bucket_of(m, key)]; e; e = e->hnext) {
        if (memcmp(e->key, key, CACHE_KEY_LEN) != 0) {
            continue;
        }
        if (e->expires_ms <= now_ms) {
            mem_remove(m, e);
            return NULL;
        }
        lru_unlink(m, e);
        lru_push_front(m, e);
        cache_entry_ref(e);
        return e;
    }
    return NULL;
}

void
cache_mem_put(struct cache_mem *m, struct cache_entry *e)
{
    if (m->max_entries == 0 || entry_size(e) > m->max_bytes || e->in_memory) {
        return;
    }
    size_t b = bucket_of(m, e->key);
    for (struct cache_entry *o = m->buckets[b]; o; o = o->hnext) {
        if (memcmp(o->key, e->key, CACHE_KEY_LEN) == 0) {
            mem_remove(m, o);
            break;
        }
    }
    cache_entry_ref(e);
    e->in_memory = true;
    e->hnext = m->buckets[b];
    m->buckets[b] = e;
    lru_push_front(m, e);
    m->count++;
    m->bytes += entry_size(e);
    mem_evict(m);
}

size_t
cache_mem_count(const struct cache_mem *m)
{
    return m->count;
}

size_t
cache_mem_bytes(const struct cache_mem *m)
{
    return m->bytes;
}

void
cache_mem_free(struct cache_mem *m)
{
    if (!m) {
        return;
    }
    while (m->lru_head) {
        mem_remove(m, m->lru_head);
    }
    free(m->buckets);
    free(m);
}
