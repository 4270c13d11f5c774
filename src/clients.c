/*
 * clients: the client set, token buckets, reservations (see clients.h).
 * Plain data with a clock passed in, so the unit tests drive it.
 */
#include "clients.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "jscan.h"
#include "log.h"

const char *const client_reason_name[CLIENT_REASONS] = {
    [CLIENT_OK] = "ok",
    [CLIENT_MAX_INFLIGHT] = "max_inflight",
    [CLIENT_RPM] = "rpm",
    [CLIENT_TPM] = "tpm",
    [CLIENT_DAY] = "tokens_per_day",
};

/* ---- token buckets ---------------------------------------------------------------------- */

void
bucket_configure(struct bucket *b, int64_t per_minute, int64_t now_us)
{
    bool fresh = b->cap == 0;

    bucket_refill(b, now_us);
    b->cap = (double)per_minute;
    b->rate = (double)per_minute / 60e6;
    b->t_us = now_us;
    if (fresh || b->level > b->cap) {
        b->level = b->cap; /* a new limit starts with its burst */
    }
}

void
bucket_refill(struct bucket *b, int64_t now_us)
{
    if (b->cap > 0 && now_us > b->t_us) {
        b->level += (double)(now_us - b->t_us) * b->rate;
        if (b->level > b->cap) {
            b->level = b->cap;
        }
    }
    if (now_us > b->t_us) {
        b->t_us = now_us;
    }
}

int64_t
bucket_wait_us(struct bucket *b, double need, int64_t now_us)
{
    if (b->cap <= 0) {
        return 0;
    }
    bucket_refill(b, now_us);
    if (need > b->cap) {
        need = b->cap; /* more than the burst: it goes when the bucket is full */
    }
    if (b->level >= need) {
        return 0;
    }
    return (int64_t)((need - b->level) / b->rate) + 1;
}

int64_t
bucket_reset_us(struct bucket *b, int64_t now_us)
{
    return bucket_wait_us(b, b->cap, now_us);
}

void
bucket_take(struct bucket *b, double n, int64_t now_us)
{
    if (b->cap > 0) {
        bucket_refill(b, now_us);
        b->level -= n;
    }
}

void
bucket_give(struct bucket *b, double n, int64_t now_us)
{
    if (b->cap > 0) {
        bucket_refill(b, now_us);
        b->level += n;
        if (b->level > b->cap) {
            b->level = b->cap;
        }
    }
}

/* ---- the set ---------------------------------------------------------------------------- */

static struct gw_client *
client_new(const char *name)
{
    struct gw_client *cl = calloc(1, sizeof(*cl));

    if (!cl || !(cl->name = strdup(name))) {
        free(cl);
        return NULL;
    }
    cl->refs = 1;
    cl->weight = 1;
    cl->max_tokens_default = 1024;
    return cl;
}

void
client_ref(struct gw_client *cl)
{
    cl->refs++;
}

void
client_unref(struct gw_client *cl)
{
    if (!cl || --cl->refs > 0) {
        return;
    }
    if (cl->token) {
        explicit_bzero(cl->token, cl->token_len);
        free(cl->token);
    }
    free(cl->name);
    free(cl);
}

static struct gw_client *
find_old(const struct clients *old, const char *name)
{
    return old ? clients_by_name(old, name) : NULL;
}

/* CL takes the limits of CC (its state stays: buckets keep their level). */
static void
client_configure(struct gw_client *cl, const struct conf_client *cc, int64_t now_us)
{
    cl->priority = cc->priority;
    cl->weight = cc->weight;
    cl->max_inflight = cc->max_inflight;
    cl->rpm = cc->rpm;
    cl->tpm = cc->tpm;
    cl->tokens_per_day = cc->tokens_per_day;
    cl->max_tokens_default = cc->max_tokens_default;
    cl->reject = cc->over_limit == OVER_LIMIT_REJECT;
    if (cc->rpm > 0) {
        bucket_configure(&cl->req, cc->rpm, now_us);
    } else {
        cl->req = (struct bucket){0};
    }
    if (cc->tpm > 0) {
        bucket_configure(&cl->tok, cc->tpm, now_us);
    } else {
        cl->tok = (struct bucket){0};
    }
}

int
clients_build(const struct conf *c, const struct clients *old, struct clients *out, int64_t now_us)
{
    bool tokens = c->nclients > 0 && c->clients[0].token_env[0] != '\0';
    struct gw_client **v = calloc(c->nclients + 1, sizeof(*v));
    size_t n = 0;

    *out = (struct clients){0};
    if (!v) {
        return -1;
    }
    for (size_t i = 0; i < c->nclients; i++) {
        const struct conf_client *cc = &c->clients[i];
        char *tok = NULL;
        if (tokens) {
            const char *t = getenv(cc->token_env);
            if (!t || !*t) {
                log_msg(LOG_WARN, "clients[%zu] (%s): variable %s is not set; that client cannot "
                        "log in", i, cc->name, cc->token_env);
                continue;
            }
            if (!(tok = strdup(t))) {
                goto fail;
            }
        }
        struct gw_client *cl = find_old(old, cc->name);
        if (cl) {
            client_ref(cl);
        } else if (!(cl = client_new(cc->name))) {
            free(tok);
            goto fail;
        }
        if (cl->token) {
            explicit_bzero(cl->token, cl->token_len);
            free(cl->token);
        }
        cl->token = tok;
        cl->token_len = tok ? strlen(tok) : 0;
        client_configure(cl, cc, now_us);
        v[n++] = cl;
    }
    if (tokens && n == 0) {
        log_msg(LOG_WARN, "no client token is set: every proxied request will get 401");
    }
    out->v = v;
    out->n = n;
    out->require_token = tokens;
    if (!tokens) {
        struct gw_client *d = clients_by_name(out, "default");
        if (!d) {
            d = find_old(old, "default");
            if (d && d->token == NULL) {
                client_ref(d);
                /* it was configured and no longer is: back to no limits */
                static const struct conf_client none = {.weight = 1, .max_tokens_default = 1024};
                client_configure(d, &none, now_us);
                d->priority = c->queue.default_priority;
            } else if (!(d = client_new("default"))) {
                goto fail;
            } else {
                d->priority = c->queue.default_priority;
            }
            v[out->n++] = d;
        }
        out->deflt = d;
    }
    return 0;
fail:
    out->v = v;
    out->n = n;
    clients_free(out);
    return -1;
}

void
clients_free(struct clients *cs)
{
    for (size_t i = 0; i < cs->n; i++) {
        client_unref(cs->v[i]);
    }
    free(cs->v);
    *cs = (struct clients){0};
}

struct gw_client *
clients_by_name(const struct clients *cs, const char *name)
{
    for (size_t i = 0; i < cs->n; i++) {
        if (strcasecmp(cs->v[i]->name, name) == 0) {
            return cs->v[i];
        }
    }
    return NULL;
}

static bool
token_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    unsigned char diff = alen != blen;

    for (size_t i = 0; i < alen && i < blen; i++) {
        diff |= (unsigned char)(a[i] ^ b[i]);
    }
    return diff == 0;
}

struct gw_client *
clients_by_token(const struct clients *cs, const char *token, size_t tl)
{
    struct gw_client *found = NULL;

    for (size_t i = 0; i < cs->n; i++) {
        /* every token is compared: how long this takes says nothing of which one matched */
        if (cs->v[i]->token && token_equal(token, tl, cs->v[i]->token, cs->v[i]->token_len)) {
            found = cs->v[i];
        }
    }
    return found;
}

/* ---- quotas ----------------------------------------------------------------------------- */

/* The non-negative integer value of top-level member KEY of BODY, or -1. */
static int64_t
body_int(const char *body, size_t len, const char *key)
{
    struct jscan_member m = {0};
    const char *what;
    size_t at;
    char num[24];

    if (jscan_object_member(body, len, key, &m, &what, &at) < 0 || m.count == 0 || m.is_string ||
        m.len == 0 || m.len >= sizeof(num)) {
        return -1;
    }
    memcpy(num, body + m.off, m.len);
    num[m.len] = '\0';
    char *end;
    long long v = strtoll(num, &end, 10);
    return (*end == '\0' && v >= 0) ? v : -1;
}

int64_t
client_estimate(const struct gw_client *cl, const char *body, size_t len)
{
    if (cl->tpm <= 0 && cl->tokens_per_day <= 0) {
        return 0; /* nothing to count it against: the body is not scanned */
    }
    int64_t out = body ? body_int(body, len, "max_completion_tokens") : -1;
    if (out < 0 && body) {
        out = body_int(body, len, "max_tokens");
    }
    if (out < 0) {
        out = cl->max_tokens_default;
    }
    return (int64_t)(len / 4) + out;
}

static int64_t
day_of(int64_t wall_s)
{
    return wall_s / 86400;
}

static void
day_turn(struct gw_client *cl, int64_t wall_s)
{
    if (day_of(wall_s) != cl->day) {
        cl->day = day_of(wall_s);
        cl->tokens_today = 0;
    }
}

enum client_reason
client_check(struct gw_client *cl, int64_t est, int64_t now_us, int64_t wall_s, int64_t *wait_us)
{
    int64_t w;

    *wait_us = 0;
    if (cl->tokens_per_day > 0) {
        day_turn(cl, wall_s);
        if (cl->tokens_today + cl->reserved >= cl->tokens_per_day) {
            *wait_us = (86400 - wall_s % 86400) * 1000000;
            return CLIENT_DAY;
        }
    }
    if (cl->max_inflight > 0 && cl->inflight >= cl->max_inflight) {
        *wait_us = -1;
        return CLIENT_MAX_INFLIGHT;
    }
    if ((w = bucket_wait_us(&cl->req, 1, now_us)) > 0) {
        *wait_us = w;
        return CLIENT_RPM;
    }
    if ((w = bucket_wait_us(&cl->tok, (double)est, now_us)) > 0) {
        *wait_us = w;
        return CLIENT_TPM;
    }
    return CLIENT_OK;
}

void
client_take(struct gw_client *cl, int64_t est, int64_t now_us)
{
    bucket_take(&cl->req, 1, now_us);
    bucket_take(&cl->tok, (double)est, now_us);
    cl->reserved += est;
}

void
client_settle(struct gw_client *cl, int64_t est, int64_t used, int64_t now_us, int64_t wall_s)
{
    cl->reserved -= est;
    if (cl->reserved < 0) {
        cl->reserved = 0;
    }
    if (used < 0) {
        bucket_give(&cl->tok, (double)est, now_us); /* no answer: the reservation comes back */
        return;
    }
    if (used <= est) {
        bucket_give(&cl->tok, (double)(est - used), now_us);
    } else {
        bucket_take(&cl->tok, (double)(used - est), now_us); /* more than reserved: a debt */
    }
    day_turn(cl, wall_s);
    cl->tokens_today += used;
}

int64_t
client_usage_total(enum dialect_id d, const int64_t *u)
{
    if (!u || (u[TOK_PROMPT] < 0 && u[TOK_COMPLETION] < 0)) {
        return -1;
    }
    int64_t t = (u[TOK_PROMPT] > 0 ? u[TOK_PROMPT] : 0) +
                (u[TOK_COMPLETION] > 0 ? u[TOK_COMPLETION] : 0);
    if (d == DIALECT_ANTHROPIC) {
        /* Anthropic's input_tokens leaves out what was read from or written to its cache */
        t += (u[TOK_CACHE_HIT] > 0 ? u[TOK_CACHE_HIT] : 0) +
             (u[TOK_CACHE_WRITE] > 0 ? u[TOK_CACHE_WRITE] : 0);
    }
    return t;
}
