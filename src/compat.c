/*
 * compat: remembered reasoning_content put back into requests (see compat.h).
 *
 *   answer ──feed──> capture (ids, reasoning) ──done, a complete 200──> remember:
 *                                              key(scope, id) -> {"reasoning_content":V}
 *                                              memory LRU, and Redis (PREFIX rc:KEY, TTL)
 *   request ──plan──> targets (assistant messages with tool_calls, no reasoning)
 *           ──fetch──> memory by any id; Redis by the first id on a miss (async)
 *           ──apply──> V spliced into the client's bytes; the model offset moves
 *
 * A record is a cache entry (cache.c's encoding, checksum and key check)
 * whose body is the object {"reasoning_content":V}: its key is a SHA-256
 * over a tag of its own, the digest of the client's scope and the tool call
 * id, so it can never be mistaken for a cached answer, nor be found from
 * another credential's request.
 */
#include "compat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "cache.h"
#include "conf.h"
#include "jscan.h"
#include "metrics.h"
#include "store.h"

#define REDIS_NS    "rc:"
#define MEMBER      "\"reasoning_content\":"
#define MEMBER_LEN  (sizeof(MEMBER) - 1)
#define KEY_TAG     "dsgate-reasoning-v1"

struct compat {
    struct cache_mem *mem;
    bool on;
    int64_t ttl_ms;
    size_t max_reasoning;
};

struct compat_req {
    struct compat *m;
    uint8_t scope[CACHE_KEY_LEN]; /* digest of the credential */
    struct compat_target *t;
    size_t nt;
    size_t waiting; /* Redis lookups out */
    bool issuing;   /* compat_fetch is sending them */
    void (*fn)(void *arg);
    void *arg;
    int restored;
    bool reading; /* the answer is read (the request offers tools) */
    bool started;
    struct compat_capture cap;
};

/* ---- bytes ----------------------------------------------------------------- */

static bool
is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static const char *
skip_ws(const char *p, const char *end)
{
    while (p < end && is_ws(*p)) {
        p++;
    }
    return p;
}

/* Past the JSON value at P (the text is valid JSON: jscan checked it), or NULL. */
static const char *
skip_value(const char *p, const char *end)
{
    int depth = 0;

    do {
        if (p >= end) {
            return NULL;
        }
        if (*p == '"') {
            for (p++; p < end && *p != '"'; p++) {
                if (*p == '\\') {
                    p++;
                }
            }
            p++;
        } else if (*p == '{' || *p == '[') {
            depth++;
            p++;
        } else if (*p == '}' || *p == ']') {
            depth--;
            p++;
        } else if (depth == 0) {
            while (p < end && !is_ws(*p) && *p != ',' && *p != '}' && *p != ']') {
                p++; /* a number or literal */
            }
        } else {
            p++;
        }
    } while (depth > 0);
    return p <= end ? p : NULL;
}

/* ---- plan ------------------------------------------------------------------ */

static void
target_clear(struct compat_target *t)
{
    for (size_t j = 0; j < t->nids; j++) {
        free(t->ids[j]);
    }
    free(t->ids);
    free(t->value);
    memset(t, 0, sizeof(*t));
}

void
compat_targets_free(struct compat_target *t, size_t nt)
{
    for (size_t i = 0; i < nt; i++) {
        target_clear(&t[i]);
    }
    free(t);
}

/*
 * Member KEY of the object at S..E: where its value is (the whole value;
 * jscan gives only a container's opening bracket), and how often it is there.
 */
static unsigned
member(const char *s, const char *e, const char *key, const char **v, size_t *vl)
{
    struct jscan_member m;
    const char *what, *ve;
    size_t at;

    if (jscan_object_member(s, (size_t)(e - s), key, &m, &what, &at) < 0 || m.count == 0 ||
        !(ve = skip_value(s + m.off, e))) {
        return 0;
    }
    *v = s + m.off;
    *vl = (size_t)(ve - *v);
    return m.count;
}

/* Is the JSON value V (VL bytes) the string WORD? */
static bool
string_is(const char *v, size_t vl, const char *word)
{
    char dec[32];

    return vl >= 2 && *v == '"' && jscan_string_decode(v, vl, dec, sizeof(dec)) >= 0 &&
           strcmp(dec, word) == 0;
}

/* The tool call ids of the array at V (VL bytes) into T; -1 out of memory. */
static int
target_ids(struct compat_target *t, const char *v, size_t vl)
{
    const char *p = v + 1, *end = v + vl - 1;
    size_t n = 0;

    for (const char *q = p; q < end && (q = memmem(q, (size_t)(end - q), "\"id\"", 4)); q += 4) {
        n++; /* at most this many */
    }
    if (n == 0 || !(t->ids = calloc(n, sizeof(*t->ids)))) {
        return n == 0 ? 0 : -1;
    }
    while ((p = skip_ws(p, end)) < end && t->nids < n) {
        const char *s = p, *id;
        size_t il;
        char dec[256];
        if (!(p = skip_value(p, end))) {
            break;
        }
        if (*s == '{' && member(s, p, "id", &id, &il) == 1 && *id == '"' &&
            jscan_string_decode(id, il, dec, sizeof(dec)) > 0) {
            if (!(t->ids[t->nids] = strdup(dec))) {
                return -1;
            }
            t->nids++;
        }
        p = skip_ws(p, end);
        if (p < end && *p == ',') {
            p++;
        }
    }
    return 0;
}

/*
 * The message at bytes S..E of BODY, when it is an assistant turn that made
 * tool calls without its reasoning (absent or null; "" is an answer, as
 * DeepSeek takes it): its target, placed in place of the null, else as a
 * new member after its last value
 * (before the white space and the closing brace).  0: T is set, 1: not a
 * target, -1: out of memory.
 */
static int
target_make(struct compat_target *t, const char *body, const char *s, const char *e)
{
    const char *v;
    size_t vl;

    if (*s != '{' || !memmem(s, (size_t)(e - s), "\"tool_calls\"", 12) ||
        member(s, e, "role", &v, &vl) != 1 || !string_is(v, vl, "assistant") ||
        member(s, e, "tool_calls", &v, &vl) != 1 || *v != '[') {
        return 1;
    }
    if (target_ids(t, v, vl) < 0) {
        return -1;
    }
    unsigned rc = member(s, e, "reasoning_content", &v, &vl);
    if (t->nids == 0 || rc > 1 || (rc == 1 && !(vl == 4 && memcmp(v, "null", 4) == 0))) {
        return 1; /* its reasoning is there, "" too (or given twice): left alone */
    }
    if (rc == 1) {
        t->at = (size_t)(v - body);
        t->cut = vl;
        return 0;
    }
    const char *q = e - 1;
    while (q > s && is_ws(q[-1])) {
        q--;
    }
    t->at = (size_t)(q - body);
    t->cut = 0;
    return 0;
}

int
compat_plan(const char *body, size_t len, struct compat_target **tp, size_t *ntp)
{
    struct compat_target *t = NULL;
    size_t nt = 0;
    struct jscan_member mm;
    const char *what;
    size_t at;

    *tp = NULL;
    *ntp = 0;
    /* cheap first: without "tool_calls" (unescaped: a name or a value) nothing is read */
    if (!memmem(body, len, "\"tool_calls\"", 12)) {
        return 0;
    }
    /* one pass checks the whole body and finds "messages" (the last one, as parsers take) */
    const char *p, *end;
    if (jscan_object_member(body, len, "messages", &mm, &what, &at) < 0 || mm.count == 0 ||
        body[mm.off] != '[' || !(end = skip_value(body + mm.off, body + len))) {
        return 0;
    }
    p = body + mm.off + 1;
    end--; /* the closing bracket */
    while ((p = skip_ws(p, end)) < end && nt < COMPAT_MAX_TARGETS) {
        const char *s = p;
        if (!(p = skip_value(p, end))) {
            break;
        }
        if (!t && !(t = calloc(COMPAT_MAX_TARGETS, sizeof(*t)))) {
            return -1;
        }
        int rc = target_make(&t[nt], body, s, p);
        if (rc < 0) {
            compat_targets_free(t, nt + 1);
            return -1;
        }
        if (rc == 0) {
            nt++;
        } else {
            target_clear(&t[nt]);
        }
        p = skip_ws(p, end);
        if (p < end && *p == ',') {
            p++;
        }
    }
    if (nt == 0) {
        free(t);
        return 0;
    }
    *tp = t;
    *ntp = nt;
    return 0;
}

/* ---- splice ---------------------------------------------------------------- */

/* What target T adds to the body's length (its value, and the member's name for a new one). */
static size_t
target_growth(const struct compat_target *t)
{
    return strlen(t->value) + (t->cut ? 0 : 1 + MEMBER_LEN) - t->cut;
}

char *
compat_splice(const char *body, size_t len, const struct compat_target *t, size_t nt,
              size_t *out_len, size_t *model_off)
{
    size_t n = len, before_model = 0;

    for (size_t i = 0; i < nt; i++) {
        if (t[i].value) {
            n += target_growth(&t[i]);
            if (model_off && t[i].at < *model_off) {
                before_model += target_growth(&t[i]);
            }
        }
    }
    char *out = malloc(n + 1), *o = out;
    if (!out) {
        return NULL;
    }
    size_t from = 0;
    for (size_t i = 0; i < nt; i++) {
        if (!t[i].value) {
            continue;
        }
        memcpy(o, body + from, t[i].at - from);
        o += t[i].at - from;
        if (t[i].cut == 0) {
            *o++ = ',';
            memcpy(o, MEMBER, MEMBER_LEN);
            o += MEMBER_LEN;
        }
        size_t vl = strlen(t[i].value);
        memcpy(o, t[i].value, vl);
        o += vl;
        from = t[i].at + t[i].cut;
    }
    memcpy(o, body + from, len - from);
    out[n] = '\0';
    *out_len = n;
    if (model_off) {
        *model_off += before_model; /* "model" is a top-level member: never inside a target */
    }
    return out;
}

/* ---- what an answer carried ------------------------------------------------ */

void
compat_capture_init(struct compat_capture *c, bool sse, size_t max)
{
    memset(c, 0, sizeof(*c));
    c->sse = sse;
    c->max = max;
}

void
compat_capture_free(struct compat_capture *c)
{
    free(c->buf);
    free(c->data);
    free(c->reasoning);
    for (size_t i = 0; i < c->nids; i++) {
        free(c->ids[i]);
    }
    memset(c, 0, sizeof(*c));
}

/* Append P to *BUF (bounded by MAX); false when it would not fit or out of memory. */
static bool
grow_add(char **buf, size_t *len, size_t *cap, size_t max, const char *p, size_t n)
{
    if (*len + n > max) {
        return false;
    }
    if (*len + n + 1 > *cap) {
        size_t nc = *cap ? *cap : 1024;
        while (nc < *len + n + 1) {
            nc *= 2;
        }
        char *b = realloc(*buf, nc);
        if (!b) {
            return false;
        }
        *buf = b;
        *cap = nc;
    }
    memcpy(*buf + *len, p, n);
    *len += n;
    (*buf)[*len] = '\0';
    return true;
}

/* The tool call ids of CALLS (an array of objects with "id"), kept once each. */
static void
capture_ids(struct compat_capture *c, const json_t *calls)
{
    size_t i;
    const json_t *call;

    json_array_foreach(calls, i, call) {
        const json_t *id = json_object_get(call, "id");
        if (!json_is_string(id) || json_string_length(id) == 0 ||
            strlen(json_string_value(id)) != json_string_length(id)) {
            continue;
        }
        bool seen = false;
        for (size_t k = 0; k < c->nids && !seen; k++) {
            seen = strcmp(c->ids[k], json_string_value(id)) == 0;
        }
        if (!seen && c->nids < COMPAT_MAX_IDS) {
            char *s = strdup(json_string_value(id));
            if (s) {
                c->ids[c->nids++] = s;
            }
        }
    }
}

/* choices[0] of an answer or a chunk, or NULL. */
static const json_t *
first_choice(const json_t *doc)
{
    const json_t *ch = json_object_get(doc, "choices");
    size_t i;
    const json_t *e;

    json_array_foreach(ch, i, e) {
        const json_t *idx = json_object_get(e, "index");
        if (!idx || (json_is_integer(idx) && json_integer_value(idx) == 0)) {
            return e;
        }
    }
    return NULL;
}

/* One SSE event's data: a chunk's reasoning piece and tool call ids, or [DONE]. */
static void
capture_event(struct compat_capture *c, const char *d, size_t n)
{
    if (n == 6 && memcmp(d, "[DONE]", 6) == 0) {
        c->done = true;
        return;
    }
    if (!memmem(d, n, "\"reasoning_content\"", 19) && !memmem(d, n, "\"tool_calls\"", 12)) {
        return; /* a content piece: nothing to read */
    }
    json_t *doc = json_loadb(d, n, 0, NULL);
    const json_t *delta = json_object_get(first_choice(doc), "delta");
    const json_t *r = json_object_get(delta, "reasoning_content");
    if (json_is_string(r) &&
        !grow_add(&c->reasoning, &c->rlen, &c->rcap, c->max, json_string_value(r),
                  json_string_length(r))) {
        c->failed = true; /* longer than compat.max_reasoning */
    }
    capture_ids(c, json_object_get(delta, "tool_calls"));
    json_decref(doc);
}

/* One SSE line (without its end): data lines gather, a blank line ends the event. */
static void
capture_line(struct compat_capture *c, const char *l, size_t n)
{
    if (n > 0 && l[n - 1] == '\r') {
        n--;
    }
    if (n == 0) {
        if (c->dlen > 0) {
            capture_event(c, c->data, c->dlen);
        }
        c->dlen = 0;
        return;
    }
    if (n < 5 || memcmp(l, "data:", 5) != 0) {
        return; /* a comment, event:, id: */
    }
    l += 5;
    n -= 5;
    if (n > 0 && *l == ' ') {
        l++;
        n--;
    }
    if ((c->dlen > 0 && !grow_add(&c->data, &c->dlen, &c->dcap, 4 * c->max, "\n", 1)) ||
        !grow_add(&c->data, &c->dlen, &c->dcap, 4 * c->max, l, n)) {
        c->failed = true;
    }
}

void
compat_capture_feed(struct compat_capture *c, const char *p, size_t len)
{
    if (c->failed) {
        return;
    }
    if (!c->sse) {
        if (!grow_add(&c->buf, &c->len, &c->cap, 4 * c->max, p, len)) {
            c->failed = true; /* the whole answer is read at its end */
        }
        return;
    }
    while (len > 0 && !c->failed) {
        const char *nl = memchr(p, '\n', len);
        size_t n = nl ? (size_t)(nl - p) : len;
        if (!nl) {
            if (!grow_add(&c->buf, &c->len, &c->cap, 4 * c->max, p, n)) {
                c->failed = true;
            }
            return;
        }
        if (c->len > 0) {
            if (!grow_add(&c->buf, &c->len, &c->cap, 4 * c->max, p, n)) {
                c->failed = true;
                return;
            }
            capture_line(c, c->buf, c->len);
            c->len = 0;
        } else if (n > 4 * c->max) {
            c->failed = true; /* as when the line had come in pieces */
            return;
        } else {
            capture_line(c, p, n);
        }
        p += n + 1;
        len -= n + 1;
    }
}

/* The JSON string token of S (N bytes), malloc'd, or NULL. */
static char *
json_token(const char *s, size_t n)
{
    json_t *js = json_stringn(s, n);
    char *q = js ? json_dumps(js, JSON_ENCODE_ANY) : NULL;

    json_decref(js);
    return q;
}

char *
compat_capture_result(struct compat_capture *c)
{
    if (c->failed) {
        return NULL;
    }
    if (c->sse) {
        return c->done && c->nids > 0 && c->rlen > 0 ? json_token(c->reasoning, c->rlen) : NULL;
    }
    json_t *doc = c->buf ? json_loadb(c->buf, c->len, 0, NULL) : NULL;
    const json_t *msg = json_object_get(first_choice(doc), "message");
    const json_t *r = json_object_get(msg, "reasoning_content");
    char *q = NULL;
    capture_ids(c, json_object_get(msg, "tool_calls"));
    if (c->nids > 0 && json_is_string(r) && json_string_length(r) > 0 &&
        json_string_length(r) <= c->max) {
        q = json_token(json_string_value(r), json_string_length(r));
    }
    json_decref(doc);
    return q;
}

/* ---- the memory ------------------------------------------------------------ */

struct compat *
compat_new(const struct conf *c)
{
    struct compat *m = calloc(1, sizeof(*m));

    if (!m) {
        return NULL;
    }
    compat_configure(m, c); /* out of memory for its LRU: off */
    return m;
}

/* Off: nothing is kept (the memory goes); on: the bounds may change. */
void
compat_configure(struct compat *m, const struct conf *c)
{
    m->on = c->compat.reasoning_content == COMPAT_REASONING_RESTORE;
    m->ttl_ms = c->cache.ttl_ms;
    m->max_reasoning = (size_t)c->compat.max_reasoning;
    if (!m->on) {
        cache_mem_free(m->mem);
        m->mem = NULL;
        return;
    }
    if (m->mem) {
        cache_mem_configure(m->mem, (size_t)c->compat.max_entries, (size_t)c->compat.max_bytes);
    } else {
        m->mem = cache_mem_new((size_t)c->compat.max_entries, (size_t)c->compat.max_bytes);
        m->on = m->mem != NULL;
    }
    metrics_add("dsgate_compat_restored_total", NULL, 0); /* shown from the start */
}

void
compat_free(struct compat *m)
{
    if (m) {
        cache_mem_free(m->mem);
        free(m);
    }
}

bool
compat_wanted(const struct compat *m, const char *path)
{
    static const char chat[] = "/chat/completions";
    size_t n = strlen(path), cl = sizeof(chat) - 1;

    return m && m->on && n >= cl && strcmp(path + n - cl, chat) == 0;
}

static int
sha256(const void *p, size_t n, uint8_t out[CACHE_KEY_LEN])
{
    unsigned int ol = 0;

    return EVP_Digest(p, n, out, &ol, EVP_sha256(), NULL) == 1 && ol == CACHE_KEY_LEN ? 0 : -1;
}

/* The record's key: tag, scope digest, tool call id. */
static int
record_key(const struct compat_req *q, const char *id, uint8_t out[CACHE_KEY_LEN])
{
    size_t il = strlen(id), n = sizeof(KEY_TAG) + CACHE_KEY_LEN + il;
    char *b = malloc(n);

    if (!b) {
        return -1;
    }
    memcpy(b, KEY_TAG, sizeof(KEY_TAG)); /* with its NUL: the tag ends there */
    memcpy(b + sizeof(KEY_TAG), q->scope, CACHE_KEY_LEN);
    memcpy(b + sizeof(KEY_TAG) + CACHE_KEY_LEN, id, il);
    int rc = sha256(b, n, out);
    free(b);
    return rc;
}

/* The JSON string token an entry holds ({"reasoning_content":V}), malloc'd; NULL if none. */
static char *
record_value(const struct cache_entry *e)
{
    struct jscan_member m;
    const char *what;
    size_t at;

    if (e->body_len < MEMBER_LEN + 4 ||
        jscan_object_member(e->body, e->body_len, "reasoning_content", &m, &what, &at) < 0 ||
        m.count != 1 || !m.is_string || m.off != 1 + MEMBER_LEN ||
        m.off + m.len != e->body_len - 1) {
        return NULL;
    }
    return strndup(e->body + m.off, m.len);
}

/* ---- a request ------------------------------------------------------------- */

struct compat_req *
compat_req_new(struct compat *m, const char *credential, const char *body, size_t len)
{
    struct compat_req *q = calloc(1, sizeof(*q));
    const char *cred = credential ? credential : "";

    if (!q || sha256(cred, strlen(cred), q->scope) < 0 ||
        compat_plan(body, len, &q->t, &q->nt) < 0) {
        free(q);
        return NULL; /* out of memory: nothing restored, nothing learnt */
    }
    q->m = m;
    for (size_t i = 0; i < q->nt; i++) {
        q->t[i].q = q;
    }
    /* only a request that offers tools gets answers with tool calls */
    q->reading = memmem(body, len, "\"tools\"", 7) != NULL;
    if (q->nt == 0 && !q->reading) {
        compat_req_free(q);
        return NULL;
    }
    return q;
}

void
compat_cancel(struct compat_req *q)
{
    for (size_t i = 0; i < q->nt; i++) {
        if (q->t[i].get) {
            store_get_cancel(q->t[i].get);
            q->t[i].get = NULL;
        }
    }
    q->waiting = 0;
    q->fn = NULL;
}

void
compat_req_free(struct compat_req *q)
{
    if (!q) {
        return;
    }
    compat_cancel(q);
    compat_targets_free(q->t, q->nt);
    compat_capture_free(&q->cap);
    free(q);
}

static void
on_record(void *arg, struct cache_entry *e)
{
    struct compat_target *t = arg;
    struct compat_req *q = t->q;

    t->get = NULL;
    if (e) {
        t->value = record_value(e);
        if (t->value && q->m->mem) {
            cache_mem_put(q->m->mem, e); /* the next turn finds it here */
        }
        cache_entry_unref(e);
    }
    if (--q->waiting == 0 && !q->issuing && q->fn) {
        void (*fn)(void *) = q->fn;
        q->fn = NULL;
        fn(q->arg);
    }
}

bool
compat_fetch(struct compat_req *q, struct store *s, void (*fn)(void *arg), void *arg)
{
    struct compat *m = q->m;
    uint8_t key[CACHE_KEY_LEN];
    int64_t now = cache_now_ms();

    q->fn = fn;
    q->arg = arg;
    q->issuing = true;
    for (size_t i = 0; i < q->nt; i++) {
        struct compat_target *t = &q->t[i];
        for (size_t j = 0; j < t->nids && !t->value && m->mem; j++) {
            struct cache_entry *e =
                record_key(q, t->ids[j], key) == 0 ? cache_mem_get(m->mem, key, now) : NULL;
            if (e) {
                t->value = record_value(e);
                cache_entry_unref(e);
            }
        }
        /* a turn's ids all hold the same reasoning: Redis is asked for the first */
        if (!t->value && s && record_key(q, t->ids[0], key) == 0) {
            q->waiting++;
            if (!(t->get = store_get_ns(s, REDIS_NS, key, on_record, t))) {
                q->waiting--; /* Redis cannot be asked now: a miss */
            }
        }
    }
    q->issuing = false;
    if (q->waiting == 0) {
        q->fn = NULL;
        return false;
    }
    return true;
}

int
compat_apply(struct compat_req *q, char **body, size_t *len, size_t *model_off)
{
    size_t found = 0, nl;

    for (size_t i = 0; i < q->nt; i++) {
        found += q->t[i].value != NULL;
    }
    if (found == 0) {
        return 0;
    }
    char *nb = compat_splice(*body, *len, q->t, q->nt, &nl, model_off);
    if (!nb) {
        return 0;
    }
    free(*body);
    *body = nb;
    *len = nl;
    q->restored = (int)found;
    metrics_add("dsgate_compat_restored_total", NULL, 1);
    return q->restored;
}

int
compat_restored(const struct compat_req *q)
{
    return q ? q->restored : 0;
}

void
compat_answer_feed(struct compat_req *q, bool sse, const char *p, size_t len)
{
    if (!q->reading) {
        return;
    }
    if (!q->started) {
        q->started = true;
        compat_capture_init(&q->cap, sse, q->m->max_reasoning);
    }
    compat_capture_feed(&q->cap, p, len);
}

void
compat_answer_done(struct compat_req *q, struct store *s)
{
    struct compat *m = q->m;
    uint8_t key[CACHE_KEY_LEN];

    if (!q->started || !m->on) {
        return;
    }
    char *v = compat_capture_result(&q->cap);
    size_t vl = v ? strlen(v) : 0;
    char *rec = v ? malloc(vl + MEMBER_LEN + 3) : NULL;
    if (rec) {
        snprintf(rec, vl + MEMBER_LEN + 3, "{%s%s}", MEMBER, v);
        int64_t expires = cache_now_ms() + m->ttl_ms;
        for (size_t i = 0; i < q->cap.nids; i++) {
            struct cache_entry *e =
                record_key(q, q->cap.ids[i], key) == 0
                    ? cache_entry_new(key, false, "", rec, vl + MEMBER_LEN + 2, expires)
                    : NULL;
            if (e) {
                cache_mem_put(m->mem, e);
                store_put_ns(s, REDIS_NS, e, m->ttl_ms);
                cache_entry_unref(e);
            }
        }
    }
    free(rec);
    free(v);
    compat_capture_free(&q->cap);
    q->started = false;
}
