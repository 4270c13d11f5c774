/*
 * compat: what dsgate does for clients that do not keep an upstream's
 * rules to the letter (compat.* in the configuration).  One thing today:
 * compat.reasoning_content: restore.
 *
 * DeepSeek's thinking models want the reasoning_content of an assistant
 * turn that made tool calls sent back on every later turn of the
 * conversation, else they answer 400; many clients drop it.  dsgate sees
 * both the answer and the next request: it remembers the reasoning of an
 * OpenAI chat answer (whole or streamed) that carried tool calls, under
 * each tool call id within the client's cache scope, and puts it back
 * into a later request's assistant message that carries those tool calls
 * without it.  The new member is spliced into the client's bytes; every
 * other byte goes upstream as the client sent it.
 *
 * Remembered reasoning lives in its own memory LRU (a cache_mem of its
 * own, compat.memory bounds) and, when the cache has its Redis tier, in
 * Redis under PREFIX "rc:" with the cache's TTL.  Nothing remembered (or
 * Redis slow or down): the request goes as it is.
 */
#ifndef DSGATE_COMPAT_H
#define DSGATE_COMPAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct conf;
struct store;

#define COMPAT_MAX_TARGETS 64 /* assistant messages restored in one request at most */
#define COMPAT_MAX_IDS     64 /* tool call ids remembered of one answer at most */

/* ---- the pure parts (tested in tests/unit/test_compat.c) ---- */

/*
 * An assistant message of the request that carries tool_calls without
 * reasoning_content (absent or null): where the value goes and under which
 * tool call ids it may be remembered.
 */
struct compat_target {
    size_t at;     /* the body's bytes AT .. AT + CUT are replaced (CUT: a null) */
    size_t cut;    /* 0: a new member goes in at AT, after the last member */
    char **ids;    /* decoded tool call ids, NIDS of them */
    size_t nids;
    char *value;   /* the reasoning as a JSON string token, once found; or NULL */
    struct store_get *get; /* its Redis lookup while one runs */
    struct compat_req *q;
};

/*
 * The targets of BODY (LEN bytes) in body order, at most
 * COMPAT_MAX_TARGETS.  Read with jscan, in bytes (no tree is built for a
 * conversation of megabytes), and only when the body has "tool_calls" at
 * all.  0 with *NT 0 when nothing lacks its reasoning or the
 * body is not a chat request that can be read; -1 out of memory.  The
 * caller frees *T with compat_targets_free.
 */
int compat_plan(const char *body, size_t len, struct compat_target **t, size_t *nt);
void compat_targets_free(struct compat_target *t, size_t nt);

/*
 * BODY with the value of every target that has one spliced in (a whole
 * member ,"reasoning_content":V for CUT 0, else V in place of the old
 * value), every other byte as it was; *OUT_LEN its length.  *MODEL_OFF
 * (the top-level model's offset, for an alias rename) moves with the
 * bytes before it.  NULL when out of memory.  The caller frees it.
 */
char *compat_splice(const char *body, size_t len, const struct compat_target *t, size_t nt,
                    size_t *out_len, size_t *model_off);

/*
 * What an answer carried, read as its bytes come: the tool call ids and
 * the reasoning of choices[0] of a chat answer, whole (JSON) or streamed
 * (SSE: delta.reasoning_content pieces, delta.tool_calls[].id).  Bounded:
 * a reasoning longer than MAX bytes (a whole answer longer than 4 * MAX)
 * is not kept.
 */
struct compat_capture {
    bool sse;
    bool failed; /* too large or not an answer: nothing to remember */
    bool done;   /* a stream's data: [DONE] came */
    size_t max;
    char *buf;   /* a whole answer, or the SSE line being read */
    size_t len, cap;
    char *data;  /* an SSE event's data lines */
    size_t dlen, dcap;
    char *reasoning; /* decoded, streams only */
    size_t rlen, rcap;
    char *ids[COMPAT_MAX_IDS];
    size_t nids;
};

void compat_capture_init(struct compat_capture *c, bool sse, size_t max);
void compat_capture_feed(struct compat_capture *c, const char *p, size_t len);
/*
 * The reasoning of a complete answer that made tool calls, as a JSON
 * string token (malloc'd; the caller frees it); the ids stay in C.
 * NULL when there is nothing to remember.
 */
char *compat_capture_result(struct compat_capture *c);
void compat_capture_free(struct compat_capture *c);

/* ---- the gateway's memory and one request's part ---- */

struct compat;
struct compat_req;

/* The remembered reasoning of a gateway; configured from C (again on reload). */
struct compat *compat_new(const struct conf *c);
void compat_configure(struct compat *m, const struct conf *c);
void compat_free(struct compat *m);

/* Is a request on PATH one that compat may restore or learn from (an OpenAI chat path)? */
bool compat_wanted(const struct compat *m, const char *path);

/*
 * A request's part: its scope (CREDENTIAL, the cache scope's credential
 * string, or NULL when the cache is shared; only its digest is kept),
 * what its body lacks and whether its answer is read.  NULL when there is
 * nothing to do.  BODY is read here only.
 */
struct compat_req *compat_req_new(struct compat *m, const char *credential, const char *body,
                                  size_t len);
void compat_req_free(struct compat_req *q);

/*
 * Look up what the body lacks: memory first, then Redis (S, or NULL) for
 * what memory misses.  False when every answer is known now; true when FN
 * (ARG) runs later from the loop (each Redis lookup ends within the
 * cache's Redis timeout).  Then compat_apply.
 */
bool compat_fetch(struct compat_req *q, struct store *s, void (*fn)(void *arg), void *arg);
/* Stop the lookups: FN will not run. */
void compat_cancel(struct compat_req *q);
/*
 * Put what was found into *BODY (replaced, the old one freed), *LEN and
 * *MODEL_OFF follow.  The number of messages restored (counted in
 * dsgate_compat_restored_total when not 0); out of memory: 0 and the body
 * as it was.
 */
int compat_apply(struct compat_req *q, char **body, size_t *len, size_t *model_off);
int compat_restored(const struct compat_req *q);

/* The answer's bytes as they reach the client; SSE: it is a stream. */
void compat_answer_feed(struct compat_req *q, bool sse, const char *p, size_t len);
/* The answer was a complete 200: remember its reasoning (memory, and Redis S when not NULL). */
void compat_answer_done(struct compat_req *q, struct store *s);

#endif
