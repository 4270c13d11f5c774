/*
 * cache: keys, entries and the memory LRU (see cache.h).
 *
 * The memory tier is a chained hash table on the key plus a doubly linked
 * LRU list: get moves an entry to the front, put evicts from the back until
 * both bounds hold.  An entry larger than the whole byte bound is not kept.
 *
 * Encoded entry (Redis tier), all integers big-endian:
 *   "DSGC" | version u8 | flags u8 (1: SSE) | expires_ms u64 | key[32] |
 *   ctype_len u16 | ctype | body_len u32 | body | fnv1a64 of all before u64
 */
#include "cache.h"
#include "dialect.h"

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

/* The key's input, built in one reusable buffer: length-prefixed fields. */
struct keybuf {
    char *p;
    size_t len, cap;
};

static int
keybuf_reserve(struct keybuf *kb, size_t need)
{
    if (kb->len + need <= kb->cap) {
        return 0;
    }
    size_t cap = kb->cap ? kb->cap : 4096;
    while (cap < kb->len + need) {
        cap *= 2;
    }
    char *p = realloc(kb->p, cap);
    if (!p) {
        return -1;
    }
    kb->p = p;
    kb->cap = cap;
    return 0;
}

static void
keybuf_len(struct keybuf *kb, size_t len)
{
    for (int i = 0; i < 8; i++) {
        kb->p[kb->len++] = (char)(uint8_t)((uint64_t)len >> (56 - 8 * i));
    }
}

static int
keybuf_field(struct keybuf *kb, const char *s, size_t len)
{
    if (keybuf_reserve(kb, len + 8) < 0) {
        return -1;
    }
    keybuf_len(kb, len);
    memcpy(kb->p + kb->len, s, len);
    kb->len += len;
    return 0;
}

/* SHA-256, fetched once (an implicit fetch on every digest costs more than the digest). */
static int
sha256(const char *p, size_t len, uint8_t out[CACHE_KEY_LEN])
{
    static EVP_MD *md;
    static EVP_MD_CTX *ctx;
    unsigned int olen = 0;

    if (!md && !(md = EVP_MD_fetch(NULL, "SHA256", NULL))) {
        return -1;
    }
    if (!ctx && !(ctx = EVP_MD_CTX_new())) {
        return -1;
    }
    if (EVP_DigestInit_ex2(ctx, md, NULL) != 1 || EVP_DigestUpdate(ctx, p, len) != 1 ||
        EVP_DigestFinal_ex(ctx, out, &olen) != 1 || olen != CACHE_KEY_LEN) {
        return -1;
    }
    return 0;
}

#define KEYBUF_KEEP (256 * 1024) /* a buffer grown beyond this is given back after use */

static struct keybuf key_kb, raw_kb;

/* The digest of what KB holds; a buffer that one large body grew is released. */
static int
keybuf_digest(struct keybuf *kb, uint8_t out[CACHE_KEY_LEN])
{
    int rc = sha256(kb->p, kb->len, out);

    if (kb->cap > KEYBUF_KEEP) {
        free(kb->p);
        kb->p = NULL;
        kb->cap = kb->len = 0;
    }
    return rc;
}

size_t
cache_keybuf_bytes(void)
{
    return key_kb.cap + raw_kb.cap;
}

int
cache_key(const char *group, const char *method, const char *path, const json_t *body,
          const char *credential, uint8_t out[CACHE_KEY_LEN])
{
    struct keybuf *kbp = &key_kb;
    static const char tag[] = "dsgate-cache-v2";
    const int flags = JSON_SORT_KEYS | JSON_COMPACT | JSON_ENCODE_ANY;

    kbp->len = 0;
    /* the credential goes into the digest, never anywhere else */
    if (keybuf_field(kbp, tag, sizeof(tag) - 1) < 0 || keybuf_field(kbp, group, strlen(group)) < 0 ||
        keybuf_field(kbp, method, strlen(method)) < 0 ||
        keybuf_field(kbp, path, strlen(path)) < 0 ||
        keybuf_field(kbp, credential ? credential : "", credential ? strlen(credential) : 0) < 0 ||
        keybuf_reserve(kbp, 8) < 0) {
        return -1;
    }
    /* the canonical body: written in place, the buffer grown when it does not fit */
    size_t at = kbp->len;
    kbp->len += 8;
    size_t n = json_dumpb(body, kbp->p + kbp->len, kbp->cap - kbp->len, flags);
    if (n == 0) {
        return -1;
    }
    if (n > kbp->cap - kbp->len) {
        if (keybuf_reserve(kbp, n) < 0) {
            return -1;
        }
        n = json_dumpb(body, kbp->p + kbp->len, kbp->cap - kbp->len, flags);
    }
    size_t end = kbp->len + n;
    kbp->len = at;
    keybuf_len(kbp, n);
    kbp->len = end;
    return keybuf_digest(kbp, out);
}

int
cache_raw_key(const char *group, const char *method, const char *path, const char *body,
              size_t len, const char *credential, uint8_t out[CACHE_KEY_LEN])
{
    struct keybuf *kbp = &raw_kb;
    static const char tag[] = "dsgate-raw-v1";

    kbp->len = 0;
    if (keybuf_field(kbp, tag, sizeof(tag) - 1) < 0 || keybuf_field(kbp, group, strlen(group)) < 0 ||
        keybuf_field(kbp, method, strlen(method)) < 0 ||
        keybuf_field(kbp, path, strlen(path)) < 0 ||
        keybuf_field(kbp, credential ? credential : "", credential ? strlen(credential) : 0) < 0 ||
        keybuf_field(kbp, body, len) < 0) {
        return -1;
    }
    return keybuf_digest(kbp, out);
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
cache_storable(const struct dialect *d, bool sse, const char *body, size_t len, size_t *start)
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
    if (!d->stream_complete(body + s, len - s)) {
        return false;
    }
    *start = s;
    return true;
}

static uint64_t
fnv1a64(const char *p, size_t n)
{
    uint64_t h = 14695981039346656037ull;

    for (size_t i = 0; i < n; i++) {
        h = (h ^ (uint8_t)p[i]) * 1099511628211ull;
    }
    return h;
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
    size_t n = HDR_LEN + cl + 4 + e->body_len + 8;
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
    p += e->body_len;
    put_u(p, fnv1a64(buf, (size_t)(p - buf)), 8);
    *len = n;
    return buf;
}

/* The shape of a stored answer: an object, or a whole SSE stream (of some dialect). */
static bool
stored_shape(bool sse, const char *b, size_t len)
{
    if (len == 0) {
        return false;
    }
    if (!sse) {
        return b[0] == '{' && b[len - 1] == '}';
    }
    if (b[0] == ':' || is_ws(b[0])) {
        return false;               /* stored streams start at their first event */
    }
    return dialect_stream_complete_any(b, len); /* the key holds the path, hence the dialect */
}

struct cache_entry *
cache_entry_decode(const uint8_t key[CACHE_KEY_LEN], const char *buf, size_t len)
{
    if (len < HDR_LEN + 4 + 8 || memcmp(buf, MAGIC, 4) != 0 || buf[4] != CACHE_FORMAT_VERSION ||
        (buf[5] & ~1) != 0) {
        return NULL;
    }
    len -= 8;
    if (get_u(buf + len, 8) != fnv1a64(buf, len)) {
        return NULL;                /* damaged, or not ours */
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
    if (!stored_shape(sse, buf + off, bl)) {
        return NULL;
    }
    return cache_entry_new(key, sse, ctype, buf + off, bl, expires);
}

/* ---- memory tier ------------------------------------------------------ */

struct alias {
    uint8_t raw[CACHE_KEY_LEN];
    uint8_t key[CACHE_KEY_LEN];
    bool used;
};

struct cache_mem {
    struct cache_entry **buckets;
    size_t nbuckets;
    struct alias *aliases;      /* nalias slots, direct-mapped by raw key */
    size_t nalias;
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
    m->nalias = m->nbuckets * 2;
    m->aliases = calloc(m->nalias, sizeof(*m->aliases)); /* also for a Redis-only cache */
    if (!m->buckets || !m->aliases) {
        free(m->buckets);
        free(m->aliases);
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

static size_t
alias_slot(const struct cache_mem *m, const uint8_t raw[CACHE_KEY_LEN])
{
    uint64_t h;

    memcpy(&h, raw, sizeof(h));
    return (size_t)(h % m->nalias);
}

bool
cache_alias_get(const struct cache_mem *m, const uint8_t raw[CACHE_KEY_LEN],
                uint8_t key[CACHE_KEY_LEN])
{
    if (!m->aliases) {
        return false;
    }
    const struct alias *a = &m->aliases[alias_slot(m, raw)];
    if (!a->used || memcmp(a->raw, raw, CACHE_KEY_LEN) != 0) {
        return false;
    }
    memcpy(key, a->key, CACHE_KEY_LEN);
    return true;
}

void
cache_alias_put(struct cache_mem *m, const uint8_t raw[CACHE_KEY_LEN],
                const uint8_t key[CACHE_KEY_LEN])
{
    if (!m->aliases) {
        return;
    }
    struct alias *a = &m->aliases[alias_slot(m, raw)];
    memcpy(a->raw, raw, CACHE_KEY_LEN);
    memcpy(a->key, key, CACHE_KEY_LEN);
    a->used = true;
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
    free(m->aliases);
    free(m);
}
