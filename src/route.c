/*
 * route: eligibility, circuit breakers, weighted choice and model name
 * rewriting (see route.h).  No I/O: request.c drives it.
 */
#include "route.h"

#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

void
circuit_init(struct circuit *c)
{
    memset(c, 0, sizeof(*c));
    c->state = CIRCUIT_CLOSED;
    c->cooldown_ms = ROUTE_COOLDOWN_MS;
}

const char *
circuit_state_name(enum circuit_state s)
{
    switch (s) {
    case CIRCUIT_CLOSED:
        return "closed";
    case CIRCUIT_OPEN:
        return "open";
    case CIRCUIT_HALF_OPEN:
        return "half_open";
    }
    return "closed";
}

bool
circuit_usable(struct circuit *c, int64_t now_us)
{
    switch (c->state) {
    case CIRCUIT_CLOSED:
        return true;
    case CIRCUIT_OPEN:
        if (now_us < c->open_until_us) {
            return false;
        }
        c->state = CIRCUIT_HALF_OPEN;
        c->probe_inflight = false;
        return true;
    case CIRCUIT_HALF_OPEN:
        return !c->probe_inflight;
    }
    return false;
}

void
circuit_on_send(struct circuit *c)
{
    if (c->state == CIRCUIT_HALF_OPEN) {
        c->probe_inflight = true;
    }
}

static void
circuit_open(struct circuit *c, int64_t cooldown_ms, const char *reason, int64_t now_us)
{
    c->state = CIRCUIT_OPEN;
    c->open_until_us = now_us + cooldown_ms * 1000;
    c->probe_inflight = false;
    strncpy(c->reason, reason, sizeof(c->reason) - 1);
    c->reason[sizeof(c->reason) - 1] = '\0';
}

bool
circuit_on_result(struct circuit *c, enum route_outcome o, const char *reason, int64_t now_us)
{
    enum circuit_state before = c->state;

    switch (o) {
    case ROUTE_NEUTRAL:
        if (c->state == CIRCUIT_HALF_OPEN) {
            c->probe_inflight = false; /* say nothing; let another probe decide */
        }
        break;
    case ROUTE_SUCCESS:
        c->failures = 0;
        c->state = CIRCUIT_CLOSED;
        c->probe_inflight = false;
        c->auth = false;
        c->cooldown_ms = ROUTE_COOLDOWN_MS;
        c->reason[0] = '\0';
        break;
    case ROUTE_AUTH_FAILURE:
        /* a failed probe doubles the wait; a first one starts it */
        c->auth_cooldown_ms = c->state == CIRCUIT_HALF_OPEN && c->auth
                                  ? (c->auth_cooldown_ms * 2 > ROUTE_AUTH_COOLDOWN_MAX_MS
                                         ? ROUTE_AUTH_COOLDOWN_MAX_MS
                                         : c->auth_cooldown_ms * 2)
                                  : ROUTE_AUTH_COOLDOWN_MS;
        c->auth = true;
        c->failures++;
        circuit_open(c, c->auth_cooldown_ms, reason, now_us);
        break;
    case ROUTE_FAILURE:
        if (c->state == CIRCUIT_OPEN && c->auth) {
            break; /* a late failure of an earlier attempt: the account is still the cause */
        }
        c->failures++;
        c->auth = false;
        if (c->state == CIRCUIT_HALF_OPEN) {
            c->cooldown_ms = c->cooldown_ms * 2 > ROUTE_COOLDOWN_MAX_MS ? ROUTE_COOLDOWN_MAX_MS
                                                                        : c->cooldown_ms * 2;
            circuit_open(c, c->cooldown_ms, reason, now_us);
        } else if (c->state == CIRCUIT_CLOSED && c->failures >= ROUTE_TRIP_FAILURES) {
            circuit_open(c, c->cooldown_ms, reason, now_us);
        }
        break;
    }
    return c->state != before;
}

enum route_outcome
route_classify_status(int status)
{
    if (status == 401 || status == 402 || status == 403) {
        return ROUTE_AUTH_FAILURE;
    }
    if (status == 429 || status >= 500) {
        return ROUTE_FAILURE;
    }
    return ROUTE_SUCCESS;
}

const char *
route_model_for(const struct conf_upstream *u, const char *model)
{
    if (u->nmodels == 0) {
        return model ? model : "";
    }
    if (!model) {
        return NULL;
    }
    for (size_t i = 0; i < u->nmodels; i++) {
        if (strcmp(u->models[i].from, model) == 0) {
            return u->models[i].to;
        }
    }
    return NULL;
}

size_t
route_swrr_pick(int64_t *current, const int *weights, const size_t *cand, size_t n)
{
    int64_t total = 0;
    size_t best = cand[0];

    for (size_t i = 0; i < n; i++) {
        size_t k = cand[i];
        current[k] += weights[k];
        total += weights[k];
        if (current[k] > current[best]) {
            best = k;
        }
    }
    current[best] -= total;
    return best;
}

/* ---- model rewriting ----------------------------------------------------- */

int
model_rewrite_init(struct model_rewrite *m, const char *from, const char *to)
{
    memset(m, 0, sizeof(*m));
    m->from = strdup(from);
    m->to = strdup(to);
    return m->from && m->to ? 0 : -1;
}

void
model_rewrite_free(struct model_rewrite *m)
{
    free(m->from);
    free(m->to);
    free(m->carry);
    memset(m, 0, sizeof(*m));
}

static bool
is_sp(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/*
 * Try to match "model" ws : ws "FROM" at P (N bytes left).  Returns the
 * match length, 0 for no match, -1 when the bytes end before it is known.
 * *VAL is set to the offset of the value's opening quote.
 */
static long
match_at(const struct model_rewrite *m, const char *p, size_t n, size_t *val)
{
    static const char key[] = "\"model\"";
    size_t kl = sizeof(key) - 1, i = 0, fl = strlen(m->from);

    for (; i < kl; i++) {
        if (i >= n) {
            return -1;
        }
        if (p[i] != key[i]) {
            return 0;
        }
    }
    while (i < n && is_sp(p[i])) {
        i++;
    }
    if (i >= n) {
        return -1;
    }
    if (p[i++] != ':') {
        return 0;
    }
    while (i < n && is_sp(p[i])) {
        i++;
    }
    if (i >= n) {
        return -1;
    }
    *val = i;
    if (p[i++] != '"') {
        return 0;
    }
    for (size_t j = 0; j < fl; j++, i++) {
        if (i >= n) {
            return -1;
        }
        if (p[i] != m->from[j]) {
            return 0;
        }
    }
    if (i >= n) {
        return -1;
    }
    return p[i] == '"' ? (long)(i + 1) : 0;
}

void
model_rewrite_feed(struct model_rewrite *m, const char *in, size_t len, struct evbuffer *out)
{
    char *buf = NULL;
    const char *p = in;
    size_t n = len;

    if (m->carry_len > 0) {
        buf = malloc(m->carry_len + len);
        if (!buf) {
            evbuffer_add(out, m->carry, m->carry_len); /* give up on this match */
            m->carry_len = 0;
        } else {
            memcpy(buf, m->carry, m->carry_len);
            memcpy(buf + m->carry_len, in, len);
            p = buf;
            n = m->carry_len + len;
            m->carry_len = 0;
        }
    }
    size_t emitted = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] != '"') {
            continue;
        }
        size_t val = 0;
        long r = match_at(m, p + i, n - i, &val);
        if (r == 0) {
            continue;
        }
        if (r < 0 && n - i > 512 + strlen(m->from)) {
            continue; /* not a plausible split match: let it go */
        }
        if (r < 0) {
            /* maybe a match split across pieces: hold it back */
            evbuffer_add(out, p + emitted, i - emitted);
            free(m->carry);
            m->carry = malloc(n - i);
            if (m->carry) {
                memcpy(m->carry, p + i, n - i);
                m->carry_len = n - i;
            } else {
                evbuffer_add(out, p + i, n - i);
            }
            free(buf);
            return;
        }
        evbuffer_add(out, p + emitted, i + val - emitted);
        evbuffer_add(out, "\"", 1);
        evbuffer_add(out, m->to, strlen(m->to));
        evbuffer_add(out, "\"", 1);
        emitted = i + (size_t)r;
        i = emitted - 1;
    }
    evbuffer_add(out, p + emitted, n - emitted);
    free(buf);
}

void
model_rewrite_flush(struct model_rewrite *m, struct evbuffer *out)
{
    if (m->carry_len > 0) {
        evbuffer_add(out, m->carry, m->carry_len);
        m->carry_len = 0;
    }
}
