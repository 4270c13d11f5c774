/*
 * http: the client-facing HTTP/1.1 server, on the libevent loop.
 *
 * A small strict server instead of evhttp: it owns framing (one of
 * Content-Length or chunked, never both, no folding, no bare CR), the limits
 * (head size -> 431, body size -> 413, header/body/idle deadlines -> 408 or
 * close, connection count), and back-pressure (the caller sees how much is
 * waiting in the socket buffer and is told when it drains).
 *
 * Ownership: the connection owns each struct http_req.  The handler may keep
 * the pointer until it calls http_reply_end() or until the close callback
 * it registered runs; after either, the pointer is dead.
 */
#ifndef DSGATE_HTTP_H
#define DSGATE_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct http_server;
struct http_req;

struct http_header {
    const char *name;
    const char *value;
};

struct http_limits {
    size_t max_body;
    size_t max_headers;
    int64_t max_connections;
    int64_t header_timeout_ms;
    int64_t body_timeout_ms;
    int64_t idle_timeout_ms;
};

typedef void (*http_handler_fn)(struct http_req *req, void *arg);
/* The client went away (or the connection failed) before the reply ended. */
typedef void (*http_close_fn)(void *arg);
/* The output buffer fell below the low-water mark. */
typedef void (*http_drain_fn)(void *arg);

struct http_req {
    uint64_t id; /* unique per process */
    const char *method;
    const char *target; /* origin-form, path + query */
    const char *path;   /* NUL-terminated copy without the query */
    const char *query;  /* after '?', or "" */
    int http_minor;     /* 0 or 1 */
    struct http_header *headers;
    size_t nheaders;
    char *body; /* NUL-terminated, body_len bytes */
    size_t body_len;
    int64_t t_start_us; /* monotonic, first byte of the request */
};

/* Start listening on "host:port".  NULL on failure (logged). */
struct http_server *http_server_new(struct event_base *base, const char *addr,
                                    const struct http_limits *lim, http_handler_fn handler,
                                    void *arg);
void http_server_set_limits(struct http_server *s, const struct http_limits *lim);
/*
 * Called when the server refuses a request itself (400, 405, 408, 413,
 * 431, ...), before its error reply; REQ may be partly parsed (method or
 * path NULL).
 */
typedef void (*http_reject_fn)(const struct http_req *req, int status, const char *code, void *arg);
void http_server_set_reject_hook(struct http_server *s, http_reject_fn fn, void *arg);
/*
 * Writes the body of every error reply on this server (http_reply_error*,
 * the server's own refusals too) into OUT; REQ's path may be NULL.  Without
 * one: OpenAI-shaped, {"error":{"message":M,"type":T,"code":C}}.
 */
struct evbuffer;
typedef void (*http_error_fn)(const struct http_req *req, int status, const char *type,
                              const char *code, const char *message, struct evbuffer *out);
void http_server_set_error_body(struct http_server *s, http_error_fn fn);
/* Close the listening socket: no new connections (drain). */
void http_server_stop_accepting(struct http_server *s);
/* Close idle keep-alive connections now and after each reply from now on. */
void http_server_close_idle(struct http_server *s);
/* Connections still open. */
size_t http_server_nconns(const struct http_server *s);
/* Address bound, as "host:port" (port resolved when 0 was asked). */
const char *http_server_addr(const struct http_server *s);
void http_server_free(struct http_server *s);

/* Case-insensitive header lookup; NULL when absent. */
const char *http_req_header(const struct http_req *r, const char *name);

void http_req_set_callbacks(struct http_req *r, http_close_fn on_close, http_drain_fn on_drain,
                            void *arg);

/* Steal the body buffer (caller frees it with free()). */
char *http_req_take_body(struct http_req *r, size_t *len);

/*
 * Start the reply.  CONTENT_LENGTH >= 0 sends Content-Length, -1 streams
 * (chunked for HTTP/1.1, close-delimited for HTTP/1.0).  HEADERS must not
 * contain framing or hop-by-hop headers.
 */
void http_reply_start(struct http_req *r, int status, const struct http_header *headers,
                      size_t nheaders, int64_t content_length);
void http_reply_data(struct http_req *r, const void *data, size_t len);
/* End the reply.  ABORT: the body is incomplete; close without a final chunk. */
void http_reply_end(struct http_req *r, bool abort);
/*
 * Body bytes that stay owned by the caller until RELEASE(ARG) runs
 * (zero-copy; for cached entries).
 */
void http_reply_data_ref(struct http_req *r, const void *data, size_t len,
                         void (*release)(void *arg), void *arg);
/* A whole reply in one call. */
void http_reply(struct http_req *r, int status, const struct http_header *headers, size_t nheaders,
                const void *body, size_t len);
/*
 * An error reply, its body as the server's error writer makes it (else
 * OpenAI-shaped), with Retry-After: 1 on 429 and 503 unless HEADERS carry
 * their own.
 */
void http_reply_error(struct http_req *r, int status, const char *type, const char *code,
                      const char *message);
void http_reply_error_h(struct http_req *r, int status, const char *type, const char *code,
                        const char *message, const struct http_header *headers, size_t nheaders);
bool http_reply_started(const struct http_req *r);
/* Bytes queued for the client and not yet written to the socket. */
size_t http_reply_pending(const struct http_req *r);

/*
 * Run the request parser (head, framing, body) over BUF as if it had
 * arrived on a connection, without sockets: for fuzzing and unit tests.
 * Returns 0 for a complete valid request, 1 when more bytes are needed,
 * else the HTTP status the connection would answer (400, 405, 413, ...).
 */
int http_parse_check(const char *buf, size_t len, size_t max_headers, size_t max_body);

/* Monotonic clock in microseconds. */
int64_t http_now_us(void);

/* Standard reason phrase ("OK", "Not Found", ...). */
const char *http_reason(int status);

#endif
