/*
 * server: the front door.  Every request from http.c comes here first:
 * dsgate's own endpoints are answered, requests are checked (client token,
 * priority, JSON on the completion endpoints) and admitted, and the rest
 * goes to request.c to be proxied.
 */
#ifndef DSGATE_SERVER_H
#define DSGATE_SERVER_H

struct evbuffer;
struct http_req;

/* The front door: every request from http.c lands here (ARG: the gateway). */
void server_handle(struct http_req *req, void *arg);
/* http.c refused a request itself (framing, limits): log and count it. */
void server_on_http_reject(const struct http_req *req, int status, const char *code, void *arg);
/*
 * The body of every error reply on the front server: the dialect of
 * REQ's path shapes it (http_error_fn).
 */
void server_error_body(const struct http_req *req, int status, const char *type, const char *code,
                       const char *message, struct evbuffer *out);
/* admin_listen: only /metrics, /healthz and /readyz. */
void server_handle_admin(struct http_req *req, void *arg);

#endif
