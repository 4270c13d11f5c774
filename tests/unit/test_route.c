/*
 * Unit tests for route.c with a fake clock: the circuit breaker's state
 * machine as scripts of steps (trip after ROUTE_TRIP_FAILURES, reset on
 * success, cooldown, a single half-open probe, doubling up to the cap, auth
 * failures, neutral outcomes), route_classify_status and route_model_for
 * tables, smooth weighted round robin (nginx's sequence, exact shares per
 * cycle, a bounded deviation at every moment, a changing candidate set) and
 * the streaming model-name rewrite, which must give the whole-buffer result
 * however its input is cut.  Run from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>

#include "conf.h"
#include "route.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))
#define MS       1000LL            /* the circuit's clock counts microseconds */
#define SEC      1000000LL
#define T0       (5000 * SEC)      /* an ordinary monotonic time, not 0 */

/* ---- circuit breaker: scripts ---------------------------------------------- */

enum op {
    END,
    FAIL,       /* on_result(ROUTE_FAILURE, reason) at t */
    AUTH,       /* on_result(ROUTE_AUTH_FAILURE, reason) at t */
    OK,         /* on_result(ROUTE_SUCCESS) at t */
    NEUTRAL,    /* on_result(ROUTE_NEUTRAL) at t */
    FAILN,      /* N times FAIL at t, none of them may change the state but the last */
    USABLE,     /* circuit_usable(t) must be `usable` */
    SEND,       /* circuit_on_send */
};

/* After each step: the state, and for OPEN the remaining cooldown. */
struct step {
    enum op op;
    int64_t t_ms;               /* since T0 */
    const char *reason;
    int n;                      /* FAILN: how many */
    int changed;                /* on_result's answer: 0, 1; -1: not checked */
    int usable;                 /* USABLE: expected answer */
    enum circuit_state state;   /* afterwards */
    int64_t until_ms;           /* OPEN: open_until - T0 in ms; -1: not checked */
    int failures;               /* -1: not checked */
    int probe;                  /* probe_inflight afterwards; -1: not checked */
    int auth;                   /* -1: not checked */
};

#define C_ CIRCUIT_CLOSED
#define O_ CIRCUIT_OPEN
#define H_ CIRCUIT_HALF_OPEN

/* Shorthands: what to check is spelled out, the rest is -1. */
#define S_FAIL(t, why, ch, st, until, nf) { FAIL, t, why, 0, ch, -1, st, until, nf, -1, -1 }
#define S_FAILN(t, n, st, until, nf)      { FAILN, t, "503", n, 1, -1, st, until, nf, -1, -1 }
#define S_AUTH(t, why, ch, until)         { AUTH, t, why, 0, ch, -1, O_, until, -1, 0, 1 }
#define S_OK(t, ch)                       { OK, t, NULL, 0, ch, -1, C_, -1, 0, 0, 0 }
#define S_NEUTRAL(t, st, probe, nf)       { NEUTRAL, t, NULL, 0, 0, -1, st, -1, nf, probe, -1 }
#define S_USABLE(t, u, st)                { USABLE, t, NULL, 0, -1, u, st, -1, -1, -1, -1 }
#define S_SEND(st, probe)                 { SEND, 0, NULL, 0, -1, -1, st, -1, -1, probe, -1 }
#define S_END                             { END, 0, NULL, 0, 0, 0, 0, 0, 0, 0, 0 }

#define TRIP ROUTE_TRIP_FAILURES
#define CD   ROUTE_COOLDOWN_MS
#define CMAX ROUTE_COOLDOWN_MAX_MS
#define ACD  ROUTE_AUTH_COOLDOWN_MS

struct script {
    const char *name;
    struct step steps[32];
};

static const struct script scripts[] = {
    { "trips after TRIP failures, not before", {
        S_FAILN(0, TRIP - 1, C_, -1, TRIP - 1),
        S_USABLE(1, 1, C_),
        S_FAIL(10, "503", 1, O_, 10 + CD, TRIP),
        S_USABLE(11, 0, O_),
        S_END } },
    { "a success resets the count", {
        S_FAILN(0, TRIP - 1, C_, -1, TRIP - 1),
        S_OK(1, 0),
        S_FAILN(2, TRIP - 1, C_, -1, TRIP - 1),
        S_USABLE(3, 1, C_),
        S_FAIL(4, "429", 1, O_, 4 + CD, TRIP),
        S_END } },
    { "open until the cooldown ends, then one probe; success closes", {
        S_FAILN(0, TRIP, O_, CD, TRIP),
        S_USABLE(CD - 1, 0, O_),
        S_USABLE(CD, 1, H_),
        S_USABLE(CD, 1, H_),            /* asking is not sending */
        S_SEND(H_, 1),
        S_USABLE(CD + 1, 0, H_),        /* the probe is out: nobody else */
        S_USABLE(CD + 100000, 0, H_),
        S_OK(CD + 200, 1),
        S_USABLE(CD + 201, 1, C_),
        S_SEND(C_, 0),
        S_SEND(C_, 0),
        /* the count starts again from zero and the cooldown from CD */
        S_FAILN(CD + 300, TRIP, O_, CD + 300 + CD, TRIP),
        S_END } },
    { "a failed probe reopens with a doubled cooldown, capped", {
        S_FAILN(0, TRIP, O_, CD, TRIP),
        S_USABLE(CD, 1, H_), S_SEND(H_, 1),
        S_FAIL(CD, "503", 1, O_, CD + 2 * CD, -1),
        S_USABLE(CD + 2 * CD - 1, 0, O_),
        S_USABLE(3 * CD, 1, H_), S_SEND(H_, 1),
        S_FAIL(3 * CD, "connect", 1, O_, 3 * CD + 4 * CD, -1),
        S_USABLE(7 * CD, 1, H_), S_SEND(H_, 1),
        S_FAIL(7 * CD, "timeout", 1, O_, 7 * CD + 8 * CD, -1),
        S_USABLE(15 * CD, 1, H_), S_SEND(H_, 1),
        S_FAIL(15 * CD, "503", 1, O_, 15 * CD + 16 * CD, -1),     /* 80 s */
        S_USABLE(31 * CD, 1, H_), S_SEND(H_, 1),
        S_FAIL(31 * CD, "503", 1, O_, 31 * CD + CMAX, -1),        /* 160 s: capped */
        S_USABLE(31 * CD + CMAX, 1, H_), S_SEND(H_, 1),
        S_FAIL(31 * CD + CMAX, "503", 1, O_, 31 * CD + 2 * CMAX, -1),
        S_USABLE(31 * CD + 2 * CMAX, 1, H_), S_SEND(H_, 1),
        /* recovery: closed, and the next trip waits CD again */
        S_OK(31 * CD + 2 * CMAX, 1),
        S_FAILN(31 * CD + 2 * CMAX + 1, TRIP, O_, 31 * CD + 2 * CMAX + 1 + CD, TRIP),
        S_END } },
    { "late failures while open change nothing", {
        S_FAILN(0, TRIP, O_, CD, TRIP),
        S_FAIL(100, "503", 0, O_, CD, -1),
        S_FAIL(200, "timeout", 0, O_, CD, -1),
        S_USABLE(CD - 1, 0, O_),
        S_END } },
    { "401/402/403 open at once for the long cooldown", {
        S_AUTH(7, "402", 1, 7 + ACD),
        S_USABLE(8, 0, O_),
        S_USABLE(7 + ACD - 1, 0, O_),
        S_USABLE(7 + ACD, 1, H_),
        S_SEND(H_, 1),
        S_USABLE(7 + ACD, 0, H_),
        S_OK(7 + ACD + 5, 1),
        S_USABLE(7 + ACD + 6, 1, C_),
        S_END } },
    { "an auth answer to a probe opens for the long cooldown", {
        S_FAILN(0, TRIP, O_, CD, TRIP),
        S_USABLE(CD, 1, H_), S_SEND(H_, 1),
        S_AUTH(CD, "401", 1, CD + ACD),
        S_USABLE(CD + ACD - 1, 0, O_),
        S_END } },
    { "a failed probe after an auth opening uses the short cooldown", {
        S_AUTH(0, "403", 1, ACD),
        S_USABLE(ACD, 1, H_), S_SEND(H_, 1),
        S_FAIL(ACD, "503", 1, O_, ACD + 2 * CD, -1),
        S_END } },
    { "neutral: no count, and a probe's neutral end lets another probe go", {
        S_FAILN(0, TRIP - 1, C_, -1, TRIP - 1),
        S_NEUTRAL(1, C_, 0, TRIP - 1),
        S_FAIL(2, "503", 1, O_, 2 + CD, TRIP),
        S_USABLE(2 + CD, 1, H_), S_SEND(H_, 1),
        S_USABLE(2 + CD, 0, H_),
        S_NEUTRAL(3 + CD, H_, 0, -1),
        S_USABLE(4 + CD, 1, H_), S_SEND(H_, 1),
        S_USABLE(4 + CD, 0, H_),
        S_OK(5 + CD, 1),
        S_END } },
    { "neutral while open keeps it open", {
        S_FAILN(0, TRIP, O_, CD, TRIP),
        S_NEUTRAL(1, O_, 0, TRIP),
        S_USABLE(CD - 1, 0, O_),
        S_END } },
};

static const char *
st_name(enum circuit_state s)
{
    return circuit_state_name(s);
}

static void
run_script(const struct script *sc)
{
    struct circuit c;

    circuit_init(&c);
    for (size_t i = 0; sc->steps[i].op != END; i++) {
        const struct step *s = &sc->steps[i];
        int64_t now = T0 + s->t_ms * MS;
        int changed = -1;

        switch (s->op) {
        case FAIL:
            changed = circuit_on_result(&c, ROUTE_FAILURE, s->reason, now);
            break;
        case FAILN:
            /* only the failure that trips may change the state */
            for (int k = 0; k < s->n; k++) {
                bool ch = circuit_on_result(&c, ROUTE_FAILURE, s->reason, now);
                bool last_trips = k == s->n - 1 && s->state == CIRCUIT_OPEN;
                if (ch != last_trips) {
                    fail_msg("%s: step %zu: failure %d of %d: changed=%d (state now %s)",
                             sc->name, i, k + 1, s->n, ch, st_name(c.state));
                }
            }
            break;
        case AUTH:
            changed = circuit_on_result(&c, ROUTE_AUTH_FAILURE, s->reason, now);
            break;
        case OK:
            changed = circuit_on_result(&c, ROUTE_SUCCESS, "", now);
            break;
        case NEUTRAL:
            changed = circuit_on_result(&c, ROUTE_NEUTRAL, "", now);
            break;
        case USABLE: {
            int u = circuit_usable(&c, now);
            if (u != s->usable) {
                fail_msg("%s: step %zu: usable at T0+%lld ms is %d, want %d (state %s)",
                         sc->name, i, (long long)s->t_ms, u, s->usable, st_name(c.state));
            }
            break;
        }
        case SEND:
            circuit_on_send(&c);
            break;
        case END:
            break;
        }
        if (s->changed >= 0 && changed >= 0 && changed != s->changed) {
            fail_msg("%s: step %zu: on_result said changed=%d, want %d", sc->name, i, changed,
                     s->changed);
        }
        if (c.state != s->state) {
            fail_msg("%s: step %zu: state %s, want %s", sc->name, i, st_name(c.state),
                     st_name(s->state));
        }
        if (s->state == CIRCUIT_OPEN && s->until_ms >= 0 &&
            c.open_until_us != T0 + s->until_ms * MS) {
            fail_msg("%s: step %zu: open until T0+%lld ms, want T0+%lld ms", sc->name, i,
                     (long long)((c.open_until_us - T0) / MS), (long long)s->until_ms);
        }
        if (s->failures >= 0 && c.failures != s->failures) {
            fail_msg("%s: step %zu: %d consecutive failures, want %d", sc->name, i, c.failures,
                     s->failures);
        }
        if (s->probe >= 0 && c.probe_inflight != (bool)s->probe) {
            fail_msg("%s: step %zu: probe_inflight %d, want %d", sc->name, i, c.probe_inflight,
                     s->probe);
        }
        if (s->auth >= 0 && c.auth != (bool)s->auth) {
            fail_msg("%s: step %zu: auth %d, want %d", sc->name, i, c.auth, s->auth);
        }
        if ((s->op == FAIL || s->op == AUTH) && s->changed == 1 &&
            strcmp(c.reason, s->reason) != 0) {
            fail_msg("%s: step %zu: reason \"%s\", want \"%s\"", sc->name, i, c.reason, s->reason);
        }
        if (c.state == CIRCUIT_CLOSED && c.reason[0] != '\0' && s->op == OK) {
            fail_msg("%s: step %zu: closed but reason \"%s\" remains", sc->name, i, c.reason);
        }
    }
}

static void
test_circuit_scripts(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(scripts); i++) {
        run_script(&scripts[i]);
    }
}

static void
test_circuit_init_and_names(void **state)
{
    struct circuit c;

    (void)state;
    memset(&c, 0x5a, sizeof(c));
    circuit_init(&c);
    assert_int_equal(c.state, CIRCUIT_CLOSED);
    assert_int_equal(c.failures, 0);
    assert_int_equal(c.cooldown_ms, ROUTE_COOLDOWN_MS);
    assert_false(c.probe_inflight);
    assert_false(c.auth);
    assert_string_equal(c.reason, "");
    assert_true(circuit_usable(&c, 0));
    assert_string_equal(circuit_state_name(CIRCUIT_CLOSED), "closed");
    assert_string_equal(circuit_state_name(CIRCUIT_OPEN), "open");
    assert_string_equal(circuit_state_name(CIRCUIT_HALF_OPEN), "half_open");
    /* the contract's constants (design.md, issue 5) */
    assert_int_equal(ROUTE_TRIP_FAILURES, 5);
    assert_int_equal(ROUTE_COOLDOWN_MS, 5000);
    assert_int_equal(ROUTE_COOLDOWN_MAX_MS, 120000);
    assert_int_equal(ROUTE_AUTH_COOLDOWN_MS, 30000);   /* probe well before 5 min (issue 14) */
    assert_int_equal(ROUTE_AUTH_COOLDOWN_MAX_MS, 300000);
}

/* A long reason is cut to fit and stays a C string. */
static void
test_circuit_long_reason(void **state)
{
    struct circuit c;

    (void)state;
    circuit_init(&c);
    assert_true(circuit_on_result(&c, ROUTE_AUTH_FAILURE,
                                  "a-reason-much-longer-than-the-field", T0));
    assert_int_equal(strlen(c.reason), sizeof(c.reason) - 1);
    assert_memory_equal(c.reason, "a-reason-much-longer-than-the-field", sizeof(c.reason) - 1);
}

/* Every (outcome, state) pair: on_result's answer equals "the state changed". */
static void
test_circuit_changed_flag(void **state)
{
    static const enum route_outcome outs[] = {
        ROUTE_SUCCESS, ROUTE_FAILURE, ROUTE_AUTH_FAILURE, ROUTE_NEUTRAL };

    (void)state;
    for (int st = 0; st < 3; st++) {
        for (size_t o = 0; o < NELEM(outs); o++) {
            for (int nf = 0; nf <= TRIP; nf++) {
                struct circuit c;
                circuit_init(&c);
                for (int k = 0; k < nf && k < TRIP - 1; k++) {
                    circuit_on_result(&c, ROUTE_FAILURE, "503", T0);
                }
                if (st != CIRCUIT_CLOSED) {
                    for (int k = 0; k < TRIP; k++) {
                        circuit_on_result(&c, ROUTE_FAILURE, "503", T0);
                    }
                    assert_int_equal(c.state, CIRCUIT_OPEN);
                }
                if (st == CIRCUIT_HALF_OPEN) {
                    assert_true(circuit_usable(&c, T0 + CD * MS));
                    circuit_on_send(&c);
                    assert_int_equal(c.state, CIRCUIT_HALF_OPEN);
                }
                enum circuit_state before = c.state;
                bool ch = circuit_on_result(&c, outs[o], "x", T0 + CD * MS);
                if (ch != (c.state != before)) {
                    fail_msg("state %s, outcome %zu, %d failures: changed=%d but %s -> %s",
                             st_name(before), o, nf, ch, st_name(before), st_name(c.state));
                }
            }
        }
    }
}

/* ---- route_classify_status ---------------------------------------------------- */

static void
test_classify_status(void **state)
{
    static const struct { int status; enum route_outcome want; } t[] = {
        { 200, ROUTE_SUCCESS }, { 201, ROUTE_SUCCESS }, { 204, ROUTE_SUCCESS },
        { 302, ROUTE_SUCCESS }, { 304, ROUTE_SUCCESS },
        /* the request's fault: the upstream itself is fine */
        { 400, ROUTE_SUCCESS }, { 404, ROUTE_SUCCESS }, { 413, ROUTE_SUCCESS },
        { 422, ROUTE_SUCCESS },
        /* the account's fault */
        { 401, ROUTE_AUTH_FAILURE }, { 402, ROUTE_AUTH_FAILURE }, { 403, ROUTE_AUTH_FAILURE },
        /* the server's */
        { 429, ROUTE_FAILURE }, { 500, ROUTE_FAILURE }, { 501, ROUTE_FAILURE },
        { 502, ROUTE_FAILURE }, { 503, ROUTE_FAILURE }, { 504, ROUTE_FAILURE },
        { 529, ROUTE_FAILURE }, { 599, ROUTE_FAILURE },
    };

    (void)state;
    for (size_t i = 0; i < NELEM(t); i++) {
        enum route_outcome o = route_classify_status(t[i].status);
        if (o != t[i].want) {
            fail_msg("status %d: outcome %d, want %d", t[i].status, o, t[i].want);
        }
    }
}

/* ---- route_model_for ------------------------------------------------------------ */

static void
test_model_for(void **state)
{
    struct conf_model map[] = {
        { "deepseek-v4-pro", "DeepSeek-R1" },
        { "deepseek-chat", "deepseek-chat" },
        { "deepseek-v4-flash", "local/flash:q4" },
    };
    struct conf_upstream any = { .name = "any" };
    struct conf_upstream some = { .name = "some", .models = map, .nmodels = NELEM(map) };
    static const struct { const char *model; const char *any, *some; } t[] = {
        { "deepseek-v4-pro", "deepseek-v4-pro", "DeepSeek-R1" },
        { "deepseek-chat", "deepseek-chat", "deepseek-chat" },
        { "deepseek-v4-flash", "deepseek-v4-flash", "local/flash:q4" },
        { "deepseek-reasoner", "deepseek-reasoner", NULL },
        { "DeepSeek-R1", "DeepSeek-R1", NULL },         /* the target is not a key */
        { "deepseek-v4-pro ", "deepseek-v4-pro ", NULL },
        { "DEEPSEEK-V4-PRO", "DEEPSEEK-V4-PRO", NULL },  /* exact names only */
        { "deepseek-v4", "deepseek-v4", NULL },
        { "", "", NULL },
        { "gpt-4o", "gpt-4o", NULL },
    };

    (void)state;
    for (size_t i = 0; i < NELEM(t); i++) {
        const char *a = route_model_for(&any, t[i].model);
        const char *s = route_model_for(&some, t[i].model);
        if (!a || strcmp(a, t[i].any) != 0) {
            fail_msg("empty map, model \"%s\": got %s%s%s", t[i].model, a ? "\"" : "",
                     a ? a : "NULL", a ? "\"" : "");
        }
        if ((s == NULL) != (t[i].some == NULL) || (s && strcmp(s, t[i].some) != 0)) {
            fail_msg("map, model \"%s\": got %s, want %s", t[i].model, s ? s : "NULL",
                     t[i].some ? t[i].some : "NULL");
        }
    }
    /* no model in the request: any upstream without a map takes it */
    assert_non_null(route_model_for(&any, NULL));
    assert_null(route_model_for(&some, NULL));
}

/* ---- smooth weighted round robin ----------------------------------------------- */

static void
test_swrr_nginx_sequence(void **state)
{
    int64_t cur[3] = { 0 };
    const int w[3] = { 5, 1, 1 };
    const size_t cand[3] = { 0, 1, 2 };
    const char want[] = "aabacaa";
    char got[sizeof(want) * 4] = "";

    (void)state;
    for (int cycle = 0; cycle < 4; cycle++) {
        for (size_t i = 0; i < 7; i++) {
            size_t k = route_swrr_pick(cur, w, cand, 3);
            assert_true(k < 3);
            got[cycle * 7 + i] = (char)('a' + k);
        }
        /* each cycle is the same and leaves the state where it began */
        assert_memory_equal(got + cycle * 7, want, 7);
        for (int k = 0; k < 3; k++) {
            assert_int_equal(cur[k], 0);
        }
    }
}

/* Weight sets: over each full cycle (sum of weights picks) the counts are
 * the weights exactly; at every moment no share strays far from its weight. */
static void
test_swrr_exact_shares(void **state)
{
    static const int sets[][8] = {
        { 1 }, { 1, 1 }, { 1, 2, 5 }, { 5, 1, 1 }, { 3, 7 }, { 1000, 1 }, { 2, 3, 5, 7, 11 },
        { 1, 1, 1, 1, 1, 1, 1, 100 }, { 16, 1, 18, 16, 3, 1 }, { 10, 10, 10 },
    };

    (void)state;
    for (size_t s = 0; s < NELEM(sets); s++) {
        size_t n = 0;
        int64_t total = 0;
        int64_t cur[8] = { 0 };
        size_t cand[8];
        int64_t count[8] = { 0 };
        while (n < 8 && sets[s][n] > 0) {
            cand[n] = n;
            total += sets[s][n];
            n++;
        }
        const int64_t picks = total * 20;
        for (int64_t p = 1; p <= picks; p++) {
            size_t k = route_swrr_pick(cur, sets[s], cand, n);
            assert_true(k < n);
            count[k]++;
            for (size_t i = 0; i < n; i++) {
                /* |count - p * w / total| < 2, in integers */
                int64_t dev = count[i] * total - p * sets[s][i];
                if (dev <= -2 * total || dev >= 2 * total) {
                    fail_msg("set %zu, after %lld picks: upstream %zu has %lld, share %.2f",
                             s, (long long)p, i, (long long)count[i],
                             (double)(p * sets[s][i]) / (double)total);
                }
            }
            if (p % total == 0) {
                for (size_t i = 0; i < n; i++) {
                    if (count[i] != (p / total) * sets[s][i]) {
                        fail_msg("set %zu, after %lld picks (a whole cycle): upstream %zu has "
                                 "%lld, want %lld", s, (long long)p, i, (long long)count[i],
                                 (long long)((p / total) * sets[s][i]));
                    }
                }
            }
        }
    }
}

/* The candidate set changes (an upstream opens, is full, comes back). */
static void
test_swrr_changing_set(void **state)
{
    const int w[4] = { 1, 2, 5, 3 };
    int64_t cur[4] = { 0 };
    int64_t count[4];
    static const struct {
        size_t cand[4];
        size_t n;
        int picks;
    } phases[] = {
        { { 0, 1, 2 }, 3, 8 * 3 + 5 },     /* cut mid-cycle */
        { { 0, 1 }, 2, 300 },               /* 2 drops out */
        { { 0, 1, 2 }, 3, 800 },            /* and comes back */
        { { 2 }, 1, 17 },                   /* alone */
        { { 1, 2, 3 }, 3, 1000 },           /* 3 joins, 0 leaves */
        { { 3, 0 }, 2, 400 },               /* listed in another order */
        { { 0, 1, 2, 3 }, 4, 1100 },
    };

    (void)state;
    for (size_t ph = 0; ph < NELEM(phases); ph++) {
        int64_t total = 0;
        memset(count, 0, sizeof(count));
        for (size_t i = 0; i < phases[ph].n; i++) {
            total += w[phases[ph].cand[i]];
        }
        for (int p = 0; p < phases[ph].picks; p++) {
            size_t k = route_swrr_pick(cur, w, phases[ph].cand, phases[ph].n);
            bool in = false;
            for (size_t i = 0; i < phases[ph].n; i++) {
                in |= phases[ph].cand[i] == k;
            }
            if (!in) {
                fail_msg("phase %zu: picked %zu, not a candidate", ph, k);
            }
            count[k]++;
        }
        /* whatever state the last phase left, the shares follow the weights
         * (within a few picks, however long the phase) */
        for (size_t i = 0; i < phases[ph].n; i++) {
            size_t k = phases[ph].cand[i];
            double want = (double)phases[ph].picks * w[k] / (double)total;
            if ((double)count[k] < want - 3.0 || (double)count[k] > want + 3.0) {
                fail_msg("phase %zu: upstream %zu picked %lld times of %d, want %.1f", ph, k,
                         (long long)count[k], phases[ph].picks, want);
            }
        }
    }
}

/* ---- model rewrite --------------------------------------------------------------- */

struct rw_case {
    const char *name;
    const char *from, *to;
    const char *in;
    const char *want;           /* the whole-buffer rewrite */
};

static const struct rw_case rw_cases[] = {
    { "compact", "DeepSeek-R1", "deepseek-v4-pro",
      "{\"id\":\"x\",\"model\":\"DeepSeek-R1\",\"choices\":[]}",
      "{\"id\":\"x\",\"model\":\"deepseek-v4-pro\",\"choices\":[]}" },
    { "spaced", "DeepSeek-R1", "deepseek-v4-pro",
      "{ \"model\" : \"DeepSeek-R1\" , \"x\" : 1 }",
      "{ \"model\" : \"deepseek-v4-pro\" , \"x\" : 1 }" },
    { "tabs and newlines", "DeepSeek-R1", "deepseek-v4-pro",
      "{\n\t\"model\"\t:\r\n  \"DeepSeek-R1\"\n}",
      "{\n\t\"model\"\t:\r\n  \"deepseek-v4-pro\"\n}" },
    { "SSE events, several occurrences", "DeepSeek-R1", "deepseek-v4-pro",
      "data: {\"id\":\"c1\",\"model\":\"DeepSeek-R1\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
      "data: {\"id\":\"c1\",\"model\":\"DeepSeek-R1\",\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n"
      ": keep-alive\n\n"
      "data: {\"model\": \"DeepSeek-R1\", \"usage\":{}}\n\n"
      "data: [DONE]\n\n",
      "data: {\"id\":\"c1\",\"model\":\"deepseek-v4-pro\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
      "data: {\"id\":\"c1\",\"model\":\"deepseek-v4-pro\",\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n"
      ": keep-alive\n\n"
      "data: {\"model\": \"deepseek-v4-pro\", \"usage\":{}}\n\n"
      "data: [DONE]\n\n" },
    { "back to back", "X", "longer-name",
      "\"model\":\"X\"\"model\":\"X\"\"model\":\"X\"",
      "\"model\":\"longer-name\"\"model\":\"longer-name\"\"model\":\"longer-name\"" },
    { "a shorter name", "a-very-long-upstream-model-name", "m",
      "[{\"model\":\"a-very-long-upstream-model-name\"},{\"model\":\"a-very-long-upstream-model-name\"}]",
      "[{\"model\":\"m\"},{\"model\":\"m\"}]" },
    { "near miss: modelx", "X", "Y",
      "{\"modelx\":\"X\",\"xmodel\":\"X\",\"Model\":\"X\",\"model \":\"X\"}",
      "{\"modelx\":\"X\",\"xmodel\":\"X\",\"Model\":\"X\",\"model \":\"X\"}" },
    { "near miss: model as a value", "X", "Y",
      "{\"name\":\"model\",\"k\":\"model\",\"x\":\"X\",\"model\":\"X\"}",
      "{\"name\":\"model\",\"k\":\"model\",\"x\":\"X\",\"model\":\"Y\"}" },
    { "near miss: another model name", "DeepSeek-R1", "deepseek-v4-pro",
      "{\"model\":\"DeepSeek-R1-Distill\",\"model\":\"DeepSeek-R\",\"model\":\"deepseek-r1\","
      "\"model\":\"xDeepSeek-R1\",\"model\":\"DeepSeek-R1\"}",
      "{\"model\":\"DeepSeek-R1-Distill\",\"model\":\"DeepSeek-R\",\"model\":\"deepseek-r1\","
      "\"model\":\"xDeepSeek-R1\",\"model\":\"deepseek-v4-pro\"}" },
    { "near miss: not a string value", "X", "Y",
      "{\"model\":null,\"model\":1,\"model\":[\"X\"],\"model\":{\"X\":1},\"model\":\"X\"}",
      "{\"model\":null,\"model\":1,\"model\":[\"X\"],\"model\":{\"X\":1},\"model\":\"Y\"}" },
    { "near miss: escaped inside a string", "X", "Y",
      "{\"content\":\"say \\\"model\\\":\\\"X\\\" twice\",\"model\":\"X\"}",
      "{\"content\":\"say \\\"model\\\":\\\"X\\\" twice\",\"model\":\"Y\"}" },
    { "near miss: no colon", "X", "Y",
      "[\"model\",\"X\",\"model\" \"X\",\"model\";\"X\"]",
      "[\"model\",\"X\",\"model\" \"X\",\"model\";\"X\"]" },
    { "quotes everywhere", "X", "Y",
      "\"\"\"\"model\"\"\"\":\"X\"\"\"model\":\"X\"\"",
      "\"\"\"\"model\"\"\"\":\"X\"\"\"model\":\"Y\"\"" },
    { "ends in a partial match", "DeepSeek-R1", "deepseek-v4-pro",
      "{\"model\":\"DeepSeek-R1\"}{\"model\":\"DeepSeek-R",
      "{\"model\":\"deepseek-v4-pro\"}{\"model\":\"DeepSeek-R" },
    { "ends in a full match without its closing quote", "DeepSeek-R1", "x",
      "{\"model\":\"DeepSeek-R1",
      "{\"model\":\"DeepSeek-R1" },
    { "ends after the key", "X", "Y", "{\"model\" : ", "{\"model\" : " },
    { "ends in a quote", "X", "Y", "\"model\":\"X\"\"", "\"model\":\"Y\"\"" },
    { "nothing to do", "X", "Y", "plain text, no quotes at all", "plain text, no quotes at all" },
    { "empty", "X", "Y", "", "" },
    { "UTF-8 around", "DeepSeek-R1", "deepseek-v4-pro",
      "{\"content\":\"\xe4\xbd\xa0\xe5\xa5\xbd\",\"model\":\"DeepSeek-R1\",\"x\":\"\xf0\x9f\x98\x80\"}",
      "{\"content\":\"\xe4\xbd\xa0\xe5\xa5\xbd\",\"model\":\"deepseek-v4-pro\",\"x\":\"\xf0\x9f\x98\x80\"}" },
    { "name with slash and colon", "qwen/deepseek:7b", "deepseek-chat",
      "{\"model\":\"qwen/deepseek:7b\"}", "{\"model\":\"deepseek-chat\"}" },
};

/* Feed IN cut at the offsets CUTS (increasing), then flush; a malloc'd C string. */
static char *
rewrite_cut(const struct rw_case *c, const size_t *cuts, size_t ncuts, size_t *outlen)
{
    struct model_rewrite m;
    struct evbuffer *out = evbuffer_new();
    size_t len = strlen(c->in), at = 0;

    assert_non_null(out);
    assert_int_equal(model_rewrite_init(&m, c->from, c->to), 0);
    for (size_t i = 0; i <= ncuts; i++) {
        size_t end = i < ncuts ? cuts[i] : len;
        model_rewrite_feed(&m, c->in + at, end - at, out);
        at = end;
    }
    model_rewrite_flush(&m, out);
    model_rewrite_free(&m);
    *outlen = evbuffer_get_length(out);
    char *s = malloc(*outlen + 1);
    assert_non_null(s);
    evbuffer_remove(out, s, *outlen);
    s[*outlen] = '\0';
    evbuffer_free(out);
    return s;
}

static void
expect_rewrite(const struct rw_case *c, const size_t *cuts, size_t ncuts, const char *how)
{
    size_t n;
    char *got = rewrite_cut(c, cuts, ncuts, &n);

    if (n != strlen(c->want) || memcmp(got, c->want, n) != 0) {
        char where[64] = "";
        if (ncuts == 1) {
            snprintf(where, sizeof(where), " at %zu", cuts[0]);
        } else if (ncuts == 2) {
            snprintf(where, sizeof(where), " at %zu and %zu", cuts[0], cuts[1]);
        }
        fail_msg("%s, cut %s%s:\n  got  %s\n  want %s", c->name, how, where, got, c->want);
    }
    free(got);
}

static void
test_rewrite_whole(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(rw_cases); i++) {
        expect_rewrite(&rw_cases[i], NULL, 0, "nowhere");
    }
}

static void
test_rewrite_every_split(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(rw_cases); i++) {
        size_t len = strlen(rw_cases[i].in);
        for (size_t a = 0; a <= len; a++) {
            expect_rewrite(&rw_cases[i], &a, 1, "once");
        }
    }
}

static void
test_rewrite_every_two_splits(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(rw_cases); i++) {
        size_t len = strlen(rw_cases[i].in);
        if (len > 200) {
            continue;
        }
        for (size_t a = 0; a <= len; a++) {
            for (size_t b = a; b <= len; b++) {
                size_t cuts[2] = { a, b };
                expect_rewrite(&rw_cases[i], cuts, 2, "twice");
            }
        }
    }
}

static void
test_rewrite_bytewise(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(rw_cases); i++) {
        size_t len = strlen(rw_cases[i].in);
        size_t *cuts = malloc((len + 1) * sizeof(*cuts));
        assert_non_null(cuts);
        for (size_t k = 0; k < len; k++) {
            cuts[k] = k + 1;
        }
        expect_rewrite(&rw_cases[i], cuts, len ? len - 1 : 0, "into 1-byte pieces");
        free(cuts);
    }
}

/* A long stream of SSE events through a few piece sizes, empty pieces too. */
static void
test_rewrite_long_stream(void **state)
{
    static const char ev_in[] =
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"DeepSeek-R1\","
        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"some words \"}}]}\n\n";
    static const char ev_out[] =
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"deepseek-v4-pro\","
        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"some words \"}}]}\n\n";
    const size_t nev = 300;
    const size_t il = strlen(ev_in), ol = strlen(ev_out);
    char *in = malloc(il * nev + 1), *want = malloc(ol * nev + 1);
    static const size_t sizes[] = { 1, 2, 3, 7, 13, 64, 100, 4096, 1 << 20 };

    (void)state;
    assert_non_null(in);
    assert_non_null(want);
    for (size_t i = 0; i < nev; i++) {
        memcpy(in + i * il, ev_in, il);
        memcpy(want + i * ol, ev_out, ol);
    }
    for (size_t s = 0; s < NELEM(sizes); s++) {
        struct model_rewrite m;
        struct evbuffer *out = evbuffer_new();
        assert_non_null(out);
        assert_int_equal(model_rewrite_init(&m, "DeepSeek-R1", "deepseek-v4-pro"), 0);
        for (size_t at = 0; at < il * nev; at += sizes[s]) {
            size_t n = il * nev - at < sizes[s] ? il * nev - at : sizes[s];
            model_rewrite_feed(&m, in + at, n, out);
            model_rewrite_feed(&m, in + at, 0, out);    /* an empty piece changes nothing */
        }
        model_rewrite_flush(&m, out);
        model_rewrite_flush(&m, out);                   /* twice: nothing more */
        model_rewrite_free(&m);
        size_t n = evbuffer_get_length(out);
        if (n != ol * nev || memcmp(evbuffer_pullup(out, -1), want, n) != 0) {
            fail_msg("pieces of %zu bytes: %zu bytes out, want %zu (or different bytes)",
                     sizes[s], n, ol * nev);
        }
        evbuffer_free(out);
    }
    free(in);
    free(want);
}

/* An auth-open circuit probes after 30 s, doubling per failed probe to 5 min; a success closes it. */
static void
test_circuit_auth_probe_backoff(void **state)
{
    struct circuit c;
    int64_t t = T0;

    (void)state;
    circuit_init(&c);
    circuit_on_result(&c, ROUTE_AUTH_FAILURE, "402", t);
    assert_int_equal(c.open_until_us - t, (int64_t)ROUTE_AUTH_COOLDOWN_MS * 1000);
    int64_t want = ROUTE_AUTH_COOLDOWN_MS;
    for (int i = 0; i < 6; i++) {
        t = c.open_until_us;
        assert_true(circuit_usable(&c, t)); /* half open: a probe */
        circuit_on_send(&c);
        circuit_on_result(&c, ROUTE_AUTH_FAILURE, "402", t);
        want = want * 2 > ROUTE_AUTH_COOLDOWN_MAX_MS ? ROUTE_AUTH_COOLDOWN_MAX_MS : want * 2;
        assert_int_equal(c.open_until_us - t, want * 1000);
    }
    /* a late 503 of an earlier attempt does not make it a failure-open circuit */
    circuit_on_result(&c, ROUTE_FAILURE, "503", t + 1);
    assert_true(c.auth);
    assert_int_equal(c.state, CIRCUIT_OPEN);
    t = c.open_until_us;
    assert_true(circuit_usable(&c, t));
    circuit_on_result(&c, ROUTE_SUCCESS, "200", t); /* the balance was topped up */
    assert_int_equal(c.state, CIRCUIT_CLOSED);
    assert_false(c.auth);
    circuit_on_result(&c, ROUTE_AUTH_FAILURE, "402", t + 5);
    assert_int_equal(c.open_until_us - (t + 5), (int64_t)ROUTE_AUTH_COOLDOWN_MS * 1000);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_circuit_init_and_names),
        cmocka_unit_test(test_circuit_scripts),
        cmocka_unit_test(test_circuit_long_reason),
        cmocka_unit_test(test_circuit_auth_probe_backoff),
        cmocka_unit_test(test_circuit_changed_flag),
        cmocka_unit_test(test_classify_status),
        cmocka_unit_test(test_model_for),
        cmocka_unit_test(test_swrr_nginx_sequence),
        cmocka_unit_test(test_swrr_exact_shares),
        cmocka_unit_test(test_swrr_changing_set),
        cmocka_unit_test(test_rewrite_whole),
        cmocka_unit_test(test_rewrite_every_split),
        cmocka_unit_test(test_rewrite_every_two_splits),
        cmocka_unit_test(test_rewrite_bytewise),
        cmocka_unit_test(test_rewrite_long_stream),
    };
    return cmocka_run_group_tests_name("route", tests, NULL, NULL);
}
