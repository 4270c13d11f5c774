/*
 * Unit tests for the clients' share of the queue and their quotas, with a
 * fake clock: start-time fair queuing inside a class (weights give their
 * split, FIFO within a flow, an idle flow saves no credit, a returning
 * item keeps its tag, a blocked flow is passed over and holds no one up,
 * aging still lifts a class by its oldest request, the victim is the
 * flood's newest), the flows' invariants under random pushes and removals
 * against a reference model, and the token buckets and reservations of
 * clients.c (burst, refill, wait, a need above the burst, reservation and
 * settlement, refund, debt, the daily budget and its turn at 00:00 UTC,
 * the estimate from the body).  Run from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "clients.h"
#include "conf.h"
#include "sched.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))
#define MS       1000LL
#define SEC      1000000LL
#define T0       (1000 * SEC)

#define H PRIO_HIGH
#define M PRIO_MEDIUM
#define L PRIO_LOW

struct thing {
    struct sched_item item; /* first, as in struct request */
    int flow;
    int seq;
    bool blocked;
};

static struct thing *
thing_of(struct sched_item *it)
{
    return (struct thing *)it;
}

/* Flow keys: any distinct addresses. */
static char keys[8];

struct fair {
    struct sched_set s;
    double finish[8][PRIO_COUNT];
    int weight[8];
};

static void
fair_push(struct fair *f, struct thing *t, int flow, int seq, enum prio p, int64_t now)
{
    t->flow = flow;
    t->seq = seq;
    t->item.flow_key = &keys[flow];
    sched_set_tag(&f->s, &t->item, p, &f->finish[flow][p], f->weight[flow] ? f->weight[flow] : 1);
    sched_set_push(&f->s, &t->item, 1, p, now);
}

static bool
is_blocked(const struct sched_item *it, void *arg)
{
    (void)arg;
    return ((const struct thing *)it)->blocked;
}

/* Serve one (NULL when none may go). */
static struct thing *
fair_pop(struct fair *f, int64_t now, int64_t aging)
{
    struct sched_item *heads[SCHED_GROUPS];
    size_t n = sched_set_heads(&f->s, now, aging, is_blocked, NULL, heads, NULL);

    if (n == 0) {
        return NULL;
    }
    sched_set_served(&f->s, heads[0]);
    sched_set_remove(&f->s, heads[0]);
    return thing_of(heads[0]);
}

/* Weights 3:1, both backlogged: 3 of every 4 served are A's, each flow in order. */
static void
test_weights_split(void **state)
{
    static struct fair f;
    static struct thing a[400], b[400];
    int served[2] = {0, 0}, next[2] = {0, 0};

    (void)state;
    memset(&f, 0, sizeof(f));
    f.weight[0] = 3;
    f.weight[1] = 1;
    for (int i = 0; i < 400; i++) {
        fair_push(&f, &a[i], 0, i, L, T0 + i);
        fair_push(&f, &b[i], 1, i, L, T0 + i);
    }
    for (int k = 0; k < 400; k++) {
        struct thing *t = fair_pop(&f, T0 + SEC, 0);
        assert_non_null(t);
        assert_int_equal(t->seq, next[t->flow]); /* FIFO within a flow */
        next[t->flow]++;
        served[t->flow]++;
        if (k % 4 == 3) {
            assert_true(abs(served[0] - 3 * served[1]) <= 3);
        }
    }
    assert_int_equal(served[0], 300);
    assert_int_equal(served[1], 100);
}

/* A floods 500, then B sends 5: B's go at once, one between each of A's. */
static void
test_flood_does_not_delay_newcomer(void **state)
{
    static struct fair f;
    static struct thing a[500], b[5];
    int order[20];

    (void)state;
    memset(&f, 0, sizeof(f));
    for (int i = 0; i < 500; i++) {
        fair_push(&f, &a[i], 0, i, L, T0 + i);
    }
    for (int i = 0; i < 3; i++) {
        assert_int_equal(fair_pop(&f, T0 + SEC, 0)->flow, 0);
    }
    for (int i = 0; i < 5; i++) {
        fair_push(&f, &b[i], 1, i, L, T0 + SEC + i);
    }
    for (int i = 0; i < 10; i++) {
        order[i] = fair_pop(&f, T0 + 2 * SEC, 0)->flow;
    }
    /* B's first goes next or after one more of A's; B's five are out within 10 */
    int nb = 0;
    for (int i = 0; i < 10; i++) {
        nb += order[i];
    }
    assert_int_equal(nb, 5);
    assert_true(order[0] == 1 || order[1] == 1);
}

/* A flow idle for long saves up no credit: it starts at the class's virtual time. */
static void
test_idle_flow_no_credit(void **state)
{
    static struct fair f;
    static struct thing a[100], b[10], a2[10];
    int nb = 0;

    (void)state;
    memset(&f, 0, sizeof(f));
    for (int i = 0; i < 100; i++) {
        fair_push(&f, &a[i], 0, i, L, T0 + i);
    }
    for (int i = 0; i < 100; i++) {
        assert_int_equal(fair_pop(&f, T0 + SEC, 0)->flow, 0);
    }
    /* B was idle all along: now it and A share 1:1, B does not get 100 in a row */
    for (int i = 0; i < 10; i++) {
        fair_push(&f, &b[i], 1, i, L, T0 + 2 * SEC + i);
        fair_push(&f, &a2[i], 0, i, L, T0 + 2 * SEC + i);
    }
    for (int i = 0; i < 6; i++) {
        nb += fair_pop(&f, T0 + 3 * SEC, 0)->flow;
    }
    assert_true(nb >= 2 && nb <= 4);
}

/* A blocked flow is passed over; when it unblocks it is served by its tags again. */
static void
test_blocked_flow_passed_over(void **state)
{
    static struct fair f;
    static struct thing a[10], b[10];

    (void)state;
    memset(&f, 0, sizeof(f));
    for (int i = 0; i < 10; i++) {
        fair_push(&f, &a[i], 0, i, L, T0 + i);
        a[i].blocked = true;
    }
    for (int i = 0; i < 10; i++) {
        fair_push(&f, &b[i], 1, i, L, T0 + 100 + i);
    }
    for (int i = 0; i < 10; i++) {
        assert_int_equal(fair_pop(&f, T0 + SEC, 0)->flow, 1);
    }
    assert_null(fair_pop(&f, T0 + SEC, 0)); /* only blocked ones are left */
    for (int i = 0; i < 10; i++) {
        a[i].blocked = false;
    }
    for (int i = 0; i < 10; i++) {
        struct thing *t = fair_pop(&f, T0 + SEC, 0);
        assert_int_equal(t->flow, 0);
        assert_int_equal(t->seq, i);
    }
}

/* One that comes back (a retry) keeps its tag: it goes before its flow's later ones. */
static void
test_returning_item_keeps_tag(void **state)
{
    static struct fair f;
    static struct thing a[4], b[4];

    (void)state;
    memset(&f, 0, sizeof(f));
    for (int i = 0; i < 4; i++) {
        fair_push(&f, &a[i], 0, i, L, T0 + i);
        fair_push(&f, &b[i], 1, i, L, T0 + 100 + i);
    }
    struct thing *t = fair_pop(&f, T0 + SEC, 0);
    assert_int_equal(t->seq, 0);
    /* back after a backoff, at its first arrival's place, with its own tag */
    sched_set_push_at(&f.s, &t->item, 1, L, t->item.t_enq_us, T0 + 2 * SEC);
    struct thing *u = fair_pop(&f, T0 + 2 * SEC, 0);
    assert_ptr_equal(u, t);
}

/* Aging lifts the class by its oldest request, whoever is first in it. */
static void
test_aging_by_oldest(void **state)
{
    static struct fair f;
    static struct thing old_a, new_b, hi;

    (void)state;
    memset(&f, 0, sizeof(f));
    f.weight[1] = 1000;
    fair_push(&f, &old_a, 0, 0, L, T0);
    /* A's finish is far ahead: B's newcomer goes first in low */
    f.finish[0][L] = 100;
    fair_push(&f, &new_b, 1, 0, L, T0 + 900 * MS);
    fair_push(&f, &hi, 2, 0, H, T0 + 900 * MS);
    /* aging 400 ms: at T0+1 s low's oldest has waited 1 s, low counts as high and is older */
    struct thing *t = fair_pop(&f, T0 + SEC, 400 * MS);
    assert_int_equal(t->item.prio, L);
}

/* The victim is the newest of the flow that flooded. */
static void
test_victim_is_flood_newest(void **state)
{
    static struct fair f;
    static struct thing a[50], b[2];

    (void)state;
    memset(&f, 0, sizeof(f));
    for (int i = 0; i < 50; i++) {
        fair_push(&f, &a[i], 0, i, L, T0 + i);
    }
    fair_push(&f, &b[0], 1, 0, L, T0 + 100);
    fair_push(&f, &b[1], 1, 1, L, T0 + 101);
    assert_ptr_equal(sched_set_victim(&f.s, H), &a[49].item);
}

/* Random pushes, removals and pops: counts, links and per-flow FIFO hold. */
static void
test_random_invariants(void **state)
{
    static struct fair f;
    static struct thing t[300];
    int next_seq[4] = {0};
    unsigned seed = 12345;

    (void)state;
    memset(&f, 0, sizeof(f));
    memset(t, 0, sizeof(t));
    for (int i = 0; i < 4; i++) {
        f.weight[i] = i + 1;
    }
    for (int step = 0; step < 20000; step++) {
        seed = seed * 1103515245u + 12345u;
        int k = (int)((seed >> 8) % 300);
        struct thing *x = &t[k];
        int64_t now = T0 + step * MS;
        if (!x->item.queued) {
            int fl = (int)((seed >> 20) % 4);
            memset(&x->item, 0, sizeof(x->item));
            fair_push(&f, x, fl, next_seq[fl]++, (enum prio)((seed >> 4) % 3), now);
        } else if ((seed >> 16) % 3 == 0) {
            sched_set_remove(&f.s, &x->item);
        } else {
            assert_non_null(fair_pop(&f, now, 0));
        }
        size_t total = 0;
        for (unsigned g = 0; g < SCHED_GROUPS; g++) {
            const struct sched_queue *q = &f.s.g[g].q;
            size_t qn = 0;
            for (int p = 0; p < PRIO_COUNT; p++) {
                size_t n = 0;
                for (struct sched_item *h = q->flows[p]; h; h = h->fnext) {
                    assert_null(h->prev);
                    if (h->fnext) {
                        assert_ptr_equal(h->fnext->fprev, h);
                        /* flows by their heads' tags */
                        assert_true(h->tag < h->fnext->tag ||
                                    (h->tag == h->fnext->tag &&
                                     h->t_enq_us <= h->fnext->t_enq_us));
                    }
                    for (struct sched_item *it = h; it; it = it->next) {
                        assert_ptr_equal(it->flow_key, h->flow_key);
                        if (it->next) {
                            assert_ptr_equal(it->next->prev, it);
                            /* FIFO within a flow: tags do not go down */
                            assert_true(it->tag <= it->next->tag);
                        } else {
                            assert_ptr_equal(h->ftail, it);
                        }
                        n++;
                    }
                }
                assert_int_equal(n, q->depth[p]);
                qn += n;
            }
            assert_int_equal(qn, q->total);
            total += qn;
        }
        assert_int_equal(total, f.s.total);
    }
}

/* ---- buckets and clients ------------------------------------------------------------------ */

static void
test_bucket_burst_refill(void **state)
{
    struct bucket b = {0};

    (void)state;
    bucket_configure(&b, 60, T0); /* 60 a minute: one a second, burst 60 */
    for (int i = 0; i < 60; i++) {
        assert_int_equal(bucket_wait_us(&b, 1, T0), 0);
        bucket_take(&b, 1, T0);
    }
    int64_t w = bucket_wait_us(&b, 1, T0);
    assert_true(w > 999 * MS && w <= SEC + 1);
    assert_int_equal(bucket_wait_us(&b, 1, T0 + SEC + 1), 0);
    /* refilled at most to the burst */
    assert_int_equal(bucket_wait_us(&b, 60, T0 + 3600 * SEC), 0);
    bucket_refill(&b, T0 + 3600 * SEC);
    assert_true(b.level <= 60.0);
    /* a need above the burst waits for a full bucket, then goes (into debt) */
    bucket_take(&b, 30, T0 + 3600 * SEC);
    w = bucket_wait_us(&b, 1000, T0 + 3600 * SEC);
    assert_true(w > 29 * SEC && w <= 30 * SEC + 1);
    assert_int_equal(bucket_wait_us(&b, 1000, T0 + 3631 * SEC), 0);
    /* the clock going back does not add or take tokens */
    bucket_refill(&b, T0 + 3631 * SEC);
    double lv = b.level;
    bucket_refill(&b, T0 + 3000 * SEC);
    assert_true(b.level == lv);
}

static void
test_bucket_reconfigure(void **state)
{
    struct bucket b = {0};

    (void)state;
    bucket_configure(&b, 100, T0);
    bucket_take(&b, 90, T0);
    bucket_configure(&b, 50, T0); /* a lower limit: the level is not raised, and capped */
    assert_true(b.level <= 10.0 + 1e-9);
    bucket_configure(&b, 1000, T0);
    assert_true(b.level <= 10.0 + 1e-9); /* a reload does not refill */
}

static struct gw_client *
client_for(int64_t rpm, int64_t tpm, int64_t day, int max_inflight)
{
    struct conf c = {0};
    struct conf_client cc = {.name = "a",
                             .token_env = "",
                             .weight = 1,
                             .max_inflight = max_inflight,
                             .rpm = rpm,
                             .tpm = tpm,
                             .tokens_per_day = day,
                             .max_tokens_default = 100};
    struct clients cs;

    c.clients = &cc;
    c.nclients = 1;
    assert_int_equal(clients_build(&c, NULL, &cs, T0), 0);
    struct gw_client *cl = clients_by_name(&cs, "a");
    assert_non_null(cl);
    assert_non_null(cs.deflt);
    assert_ptr_not_equal(cs.deflt, cl);
    client_ref(cl);
    clients_free(&cs);
    return cl;
}

#define DAY0 (20000LL * 86400) /* a UTC midnight */

/* Parallel reservations cannot overshoot: the N+1th waits, settlement gives back the rest. */
static void
test_reserve_and_settle(void **state)
{
    struct gw_client *cl = client_for(0, 1000, 0, 0);
    int64_t w;
    int admitted = 0;

    (void)state;
    for (int i = 0; i < 10; i++) {
        if (client_check(cl, 300, T0, DAY0, &w) == CLIENT_OK) {
            client_take(cl, 300, T0);
            admitted++;
        } else {
            assert_int_equal(client_check(cl, 300, T0, DAY0, &w), CLIENT_TPM);
            assert_true(w > 0);
        }
    }
    assert_int_equal(admitted, 3);
    assert_int_equal(cl->reserved, 900);
    /* each used 50 of its 300: 750 come back at once */
    for (int i = 0; i < 3; i++) {
        client_settle(cl, 300, 50, T0, DAY0);
    }
    assert_int_equal(cl->reserved, 0);
    bucket_refill(&cl->tok, T0);
    assert_true(cl->tok.level > 849.0 && cl->tok.level < 851.0);
    assert_int_equal(cl->tokens_today, 150);
    /* no answer: the whole reservation comes back */
    client_take(cl, 300, T0);
    client_settle(cl, 300, -1, T0, DAY0);
    bucket_refill(&cl->tok, T0);
    assert_true(cl->tok.level > 849.0 && cl->tok.level < 851.0);
    /* more than reserved: a debt that later requests wait for */
    client_take(cl, 300, T0);
    client_settle(cl, 300, 1800, T0, DAY0);
    assert_int_equal(client_check(cl, 10, T0, DAY0, &w), CLIENT_TPM);
    assert_true(w > 55 * SEC); /* about 960 tokens to refill at 1000 a minute */
    client_unref(cl);
}

static void
test_rpm_and_inflight(void **state)
{
    struct gw_client *cl = client_for(2, 0, 0, 1);
    int64_t w;

    (void)state;
    assert_int_equal(client_check(cl, 0, T0, DAY0, &w), CLIENT_OK);
    client_take(cl, 0, T0);
    cl->inflight = 1;
    assert_int_equal(client_check(cl, 0, T0, DAY0, &w), CLIENT_MAX_INFLIGHT);
    assert_int_equal(w, -1);
    cl->inflight = 0;
    client_take(cl, 0, T0);
    assert_int_equal(client_check(cl, 0, T0, DAY0, &w), CLIENT_RPM);
    assert_true(w > 29 * SEC && w <= 30 * SEC + 1); /* 2 a minute: one every 30 s */
    assert_int_equal(client_check(cl, 0, T0 + 30 * SEC + 1, DAY0, &w), CLIENT_OK);
    client_unref(cl);
}

static void
test_daily_budget(void **state)
{
    struct gw_client *cl = client_for(0, 0, 300, 0);
    int64_t w;

    (void)state;
    assert_int_equal(client_check(cl, 100, T0, DAY0 + 10, &w), CLIENT_OK);
    client_take(cl, 100, T0);
    client_settle(cl, 100, 250, T0, DAY0 + 20);
    assert_int_equal(client_check(cl, 100, T0, DAY0 + 30, &w), CLIENT_OK);
    client_take(cl, 100, T0);
    /* 250 spent + 100 reserved: spent while the reservation runs */
    assert_int_equal(client_check(cl, 100, T0, DAY0 + 40, &w), CLIENT_DAY);
    assert_int_equal(w, (86400 - 40) * SEC);
    client_settle(cl, 100, 60, T0, DAY0 + 50);
    assert_int_equal(client_check(cl, 100, T0, DAY0 + 86399, &w), CLIENT_DAY);
    assert_int_equal(w, 1 * SEC);
    /* the day turns */
    assert_int_equal(client_check(cl, 100, T0, DAY0 + 86400, &w), CLIENT_OK);
    assert_int_equal(cl->tokens_today, 0);
    client_unref(cl);
}

static void
test_estimate(void **state)
{
    struct gw_client *cl = client_for(0, 1000, 0, 0);
    static const char a[] = "{\"model\":\"m\",\"max_tokens\":500,\"messages\":[]}";
    static const char b[] = "{\"max_completion_tokens\":7,\"max_tokens\":500}";
    static const char c[] = "{\"model\":\"m\"}";
    static const char d[] = "{\"max_tokens\":\"x\"}";

    (void)state;
    assert_int_equal(client_estimate(cl, a, strlen(a)), (int64_t)(strlen(a) / 4) + 500);
    assert_int_equal(client_estimate(cl, b, strlen(b)), (int64_t)(strlen(b) / 4) + 7);
    assert_int_equal(client_estimate(cl, c, strlen(c)), (int64_t)(strlen(c) / 4) + 100);
    assert_int_equal(client_estimate(cl, d, strlen(d)), (int64_t)(strlen(d) / 4) + 100);
    client_unref(cl);
}

/* A reload keeps the state of a client that keeps its name. */
static void
test_reload_keeps_state(void **state)
{
    struct conf c = {0};
    struct conf_client cc[2] = {
        {.name = "a", .token_env = "", .weight = 1, .rpm = 10, .max_tokens_default = 1},
        {.name = "b", .token_env = "", .weight = 2, .max_tokens_default = 1},
    };
    struct clients one, two;

    (void)state;
    c.clients = cc;
    c.nclients = 2;
    assert_int_equal(clients_build(&c, NULL, &one, T0), 0);
    struct gw_client *a = clients_by_name(&one, "A"); /* case-insensitive */
    assert_non_null(a);
    client_take(a, 0, T0);
    a->tokens_today = 42;
    cc[0].rpm = 20;
    c.nclients = 1; /* b is dropped */
    assert_int_equal(clients_build(&c, &one, &two, T0), 0);
    assert_ptr_equal(clients_by_name(&two, "a"), a);
    assert_int_equal(a->tokens_today, 42);
    assert_int_equal(a->rpm, 20);
    assert_null(clients_by_name(&two, "b"));
    clients_free(&one);
    clients_free(&two);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_weights_split),
        cmocka_unit_test(test_flood_does_not_delay_newcomer),
        cmocka_unit_test(test_idle_flow_no_credit),
        cmocka_unit_test(test_blocked_flow_passed_over),
        cmocka_unit_test(test_returning_item_keeps_tag),
        cmocka_unit_test(test_aging_by_oldest),
        cmocka_unit_test(test_victim_is_flood_newest),
        cmocka_unit_test(test_random_invariants),
        cmocka_unit_test(test_bucket_burst_refill),
        cmocka_unit_test(test_bucket_reconfigure),
        cmocka_unit_test(test_reserve_and_settle),
        cmocka_unit_test(test_rpm_and_inflight),
        cmocka_unit_test(test_daily_budget),
        cmocka_unit_test(test_estimate),
        cmocka_unit_test(test_reload_keeps_state),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
