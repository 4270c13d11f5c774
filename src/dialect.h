/*
 * dialect: the API a request speaks, chosen from its path once, when the
 * request starts: Anthropic Messages under /anthropic/ and /v1/messages,
 * OpenAI (chat, completions, embeddings) everywhere else.
 *
 * One const table per dialect says what differs between the two: how a
 * complete streamed answer ends (the cache stores only those), where the
 * token counts of an answer are, how dsgate writes its own errors, SSE
 * error events and stream keep-alives, where a client's dsgate token may
 * be (clients:), which upstream statuses mean busy, and which paths are
 * cheap (answered at once, never queued behind completions).  The request
 * keeps a pointer to its table; nothing else asks which dialect it is.
 *
 * The credential headers that scope the cache are one list for every
 * dialect (credential_headers, attempt.h): a client of either API may
 * send any of them, and scoping by fewer would let an answer cross.
 */
#ifndef DSGATE_DIALECT_H
#define DSGATE_DIALECT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct evbuffer;

enum dialect_id { DIALECT_OPENAI, DIALECT_ANTHROPIC, DIALECTS };

#define DIALECT_BIT(id) (1u << (id))
#define DIALECT_ALL     ((1u << DIALECTS) - 1)

/* The kinds of dsgate_tokens_total{upstream,kind}: one index per kind. */
enum token_kind {
    TOK_PROMPT,      /* OpenAI prompt_tokens; Anthropic input_tokens */
    TOK_COMPLETION,  /* OpenAI completion_tokens; Anthropic output_tokens */
    TOK_CACHE_HIT,   /* DeepSeek prompt_cache_hit_tokens; Anthropic cache_read_input_tokens */
    TOK_CACHE_MISS,  /* DeepSeek prompt_cache_miss_tokens */
    TOK_CACHE_WRITE, /* Anthropic cache_creation_input_tokens */
    TOK_KINDS
};

extern const char *const token_kind_name[TOK_KINDS];

/* An error dsgate writes itself, in any dialect. */
struct dialect_error {
    int status;          /* the HTTP status it stands for (an Anthropic type follows from it) */
    bool with_status;    /* SSE, OpenAI: add "status" to the error object */
    const char *type;    /* dsgate's OpenAI type ("upstream_error", "rate_limit_error", ...) */
    const char *code;    /* dsgate's code ("queue_full", ...) */
    const char *message;
};

/* Where a client's dsgate token may be: HEADER, its value after SCHEME ("" for the whole). */
struct dialect_token {
    const char *header;
    const char *scheme;
};

struct dialect {
    enum dialect_id id;
    const char *name;         /* as upstreams[].dialects names it */
    const char *title;        /* for messages */
    bool (*matches)(const char *path);
    /* A path answered at once, outside the queue and the concurrency limit. */
    bool (*cheap)(const char *path);
    /* Is BODY (LEN bytes, from its first event) a whole stream, ended as this API ends one? */
    bool (*stream_complete)(const char *body, size_t len);
    /*
     * The token counts of a 200 answer into TOKENS (left as they are where
     * the answer says nothing): HEAD is its first HEAD_LEN bytes, TAIL its
     * last TAIL_LEN (the same bytes for a short answer); SSE: a stream.
     */
    void (*usage)(const char *head, size_t head_len, const char *tail, size_t tail_len, bool sse,
                  int64_t tokens[TOK_KINDS]);
    /* An error body (JSON and a newline), appended to OUT. */
    void (*error_body)(struct evbuffer *out, const struct dialect_error *e);
    /* An SSE error event, appended to OUT. */
    void (*sse_error)(struct evbuffer *out, const struct dialect_error *e);
    const char *sse_keepalive;           /* dsgate's own keep-alive in a stream: one whole event */
    const struct dialect_token *tokens;  /* ends with {NULL, NULL} */
    const int *busy;                     /* upstream statuses meaning busy; ends with 0 */
};

extern const struct dialect dialect_openai;
extern const struct dialect dialect_anthropic;

/* The dialect of a request for PATH (NULL: OpenAI). */
const struct dialect *dialect_of_path(const char *path);
const struct dialect *dialect_by_id(enum dialect_id id);
/* The id of NAME ("openai", "anthropic"), or -1. */
int dialect_by_name(const char *name);
/* Does STATUS mean busy in D (Anthropic: 529)? */
bool dialect_busy(const struct dialect *d, int status);
/* Is BODY a whole stream in any dialect (a stored entry is checked so)? */
bool dialect_stream_complete_any(const char *body, size_t len);

#endif
