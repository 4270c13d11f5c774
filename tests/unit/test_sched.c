/*
 * Unit tests for sched.c with a fake clock: the class queue (order by class,
 * FIFO within a class, aging one class per period, removal from anywhere,
 * the displacement victim), a randomised comparison with a reference model,
 * the queues by destination (sched_set: a queue per set of upstreams, the
 * shared overflow queue, heads in order, victims across queues), and the
 * adaptive concurrency limit (x0.7 when overloads are 30 % or more of a
 * window of outcomes, never below 1, +1/limit per success up to
 * max_inflight, reload, adaptive
 * off).  Most tests are tables.  Run from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "conf.h"
#include "sched.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))
#define MS       1000LL            /* the queue's clock counts microseconds */
#define SEC      1000000LL
#define T0       (1000 * SEC)      /* an ordinary monotonic time, not 0 */

#define H PRIO_HIGH
#define M PRIO_MEDIUM
#define L PRIO_LOW

/* A queued thing with a name, as request.c embeds sched_item. */
struct thing {
    struct sched_item item;
    const char *name;
};

static struct thing *thing_of(struct sched_item *it)
{
    return it ? (struct thing *)((char *)it - offsetof(struct thing, item)) : NULL;
}

/* Pop everything at NOW (served one by one at the same instant); the names
 * in order, space separated. */
static void drain(struct sched_queue *q, int64_t now, int64_t aging, char *out, size_t len)
{
    struct sched_item *it;

    out[0] = '\0';
    while ((it = sched_queue_peek(q, now, aging, NULL, NULL, NULL))) {
        size_t n = strlen(out);
        snprintf(out + n, len - n, "%s%s", n ? " " : "", thing_of(it)->name);
        sched_queue_remove(q, it);
    }
    assert_int_equal(q->total, 0);
}

static void check_counts(const struct sched_queue *q)
{
    size_t sum = 0;

    for (int p = 0; p < PRIO_COUNT; p++) {
        size_t n = 0;
        for (struct sched_item *h = q->flows[p]; h; h = h->fnext) {
            assert_null(h->prev);
            if (h->fnext) {
                assert_ptr_equal(h->fnext->fprev, h);
            }
            for (struct sched_item *it = h; it; it = it->next) {
                assert_int_equal(it->prio, p);
                assert_true(it->queued);
                assert_ptr_equal(it->flow_key, h->flow_key);
                if (!it->next) {
                    assert_ptr_equal(h->ftail, it);
                }
                n++;
            }
        }
        assert_int_equal(n, q->depth[p]);
        sum += n;
    }
    assert_int_equal(sum, q->total);
}

/* ---- ordering ------------------------------------------------------------- */

struct push {
    const char *name;
    int prio;
    int64_t t_ms;                   /* enqueue time after T0 */
};

static const struct {
    const char *what;
    struct push pushes[10];
    int64_t now_ms;                 /* when they are served (all at once) */
    int64_t aging_ms;               /* 0: no aging */
    const char *order;
} order_cases[] = {
    { "by class, FIFO within a class",
      { { "l1", L, 0 }, { "m1", M, 1 }, { "h1", H, 2 }, { "l2", L, 3 }, { "h2", H, 4 },
        { "m2", M, 5 }, { "l3", L, 6 } },
      10, 0, "h1 h2 m1 m2 l1 l2 l3" },
    { "one class is FIFO",
      { { "a", M, 0 }, { "b", M, 0 }, { "c", M, 0 }, { "d", M, 5 }, { "e", M, 9 } },
      10, 0, "a b c d e" },
    { "no aging even after hours",
      { { "l", L, 0 }, { "m", M, 1 }, { "h", H, 2 } },
      10 * 3600 * 1000, 0, "h m l" },
    { "aging period not reached",
      { { "l", L, 0 }, { "m", M, 100 }, { "h", H, 150 } },
      199, 200, "h m l" },
    { "low aged to medium, older than the medium: first among mediums",
      { { "l", L, 0 }, { "m", M, 100 } },
      250, 200, "l m" },
    { "low aged to medium behind an older medium",
      { { "m", M, 0 }, { "l", L, 10 } },
      300, 200, "m l" },
    { "low aged one class does not pass a high",
      { { "l", L, 0 }, { "h", H, 100 } },
      250, 200, "h l" },
    { "low aged two classes: before a newer high",
      { { "l", L, 0 }, { "h", H, 100 } },
      400, 200, "l h" },
    { "medium aged to high before a newer high",
      { { "m", M, 0 }, { "h", H, 100 } },
      200, 200, "m h" },
    { "mixed: by class after aging, then by age",
      /* at 800: l1 high (4 periods), m1 high (1), h1 high, l2 medium (1), m2 medium */
      { { "l1", L, 0 }, { "l2", L, 500 }, { "m1", M, 600 }, { "h1", H, 700 }, { "m2", M, 750 } },
      800, 200, "l1 m1 h1 l2 m2" },
    { "aging is capped at high",
      { { "l", L, 0 }, { "m", M, 1 }, { "h", H, 2 } },
      100000, 10, "l m h" },
};

static void test_order_table(void **state)
{
    (void)state;
    for (size_t c = 0; c < NELEM(order_cases); c++) {
        struct sched_queue q;
        struct thing th[10];
        char got[256];
        size_t n = 0;

        memset(&q, 0, sizeof(q));
        memset(th, 0, sizeof(th));
        for (; n < NELEM(order_cases[c].pushes) && order_cases[c].pushes[n].name; n++) {
            const struct push *p = &order_cases[c].pushes[n];
            th[n].name = p->name;
            sched_queue_push(&q, &th[n].item, (enum prio)p->prio, T0 + p->t_ms * MS);
        }
        check_counts(&q);
        assert_int_equal(q.total, n);
        drain(&q, T0 + order_cases[c].now_ms * MS, order_cases[c].aging_ms * MS, got,
              sizeof(got));
        if (strcmp(got, order_cases[c].order) != 0) {
            fail_msg("%s: order \"%s\", want \"%s\"", order_cases[c].what, got,
                     order_cases[c].order);
        }
        check_counts(&q);
    }
}

/* sched_effective: class after aging. */
static void test_effective_table(void **state)
{
    static const struct {
        int prio;
        int64_t enq_ms, now_ms, aging_ms;
        int want;
    } cases[] = {
        { L, 0, 0, 200, L },
        { L, 0, 199, 200, L },
        { L, 0, 200, 200, M },          /* exactly one period */
        { L, 0, 399, 200, M },
        { L, 0, 400, 200, H },
        { L, 0, 100000, 200, H },       /* never beyond high */
        { M, 0, 199, 200, M },
        { M, 0, 200, 200, H },
        { H, 0, 100000, 200, H },
        { L, 0, 100000, 0, L },         /* aging off */
        { M, 0, 100000, 0, M },
        { L, 500, 100, 200, L },        /* clock before enqueue: no change */
        { L, 1000, 1000, 1, L },
        { L, 1000, 1001, 1, M },
        { L, 1000, 1002, 1, H },
        { L, 0, 30000, 30000, M },      /* the default period, 30 s */
        { L, 0, 59999, 30000, M },
        { L, 0, 60000, 30000, H },
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        struct sched_item it;
        memset(&it, 0, sizeof(it));
        it.prio = (enum prio)cases[i].prio;
        it.t_enq_us = T0 + cases[i].enq_ms * MS;
        enum prio got = sched_effective(&it, T0 + cases[i].now_ms * MS, cases[i].aging_ms * MS);
        if ((int)got != cases[i].want) {
            fail_msg("case %zu: prio %d enq %lld now %lld aging %lld: %d, want %d", i,
                     cases[i].prio, (long long)cases[i].enq_ms, (long long)cases[i].now_ms,
                     (long long)cases[i].aging_ms, (int)got, cases[i].want);
        }
    }
}

/* Aging over time with a fake clock: a steady stream of high arrivals
 * does not starve an old low one. */
static void test_aging_no_starvation(void **state)
{
    struct sched_queue q;
    struct thing low = { .name = "low" };
    struct thing hs[64];
    int64_t aging = 200 * MS, now = T0;
    int served_at = -1;

    (void)state;
    memset(&q, 0, sizeof(q));
    memset(hs, 0, sizeof(hs));
    sched_queue_push(&q, &low.item, L, now);
    /* every 50 ms a high arrives and one request is served */
    for (int i = 0; i < 64 && served_at < 0; i++) {
        now += 50 * MS;
        hs[i].name = "high";
        sched_queue_push(&q, &hs[i].item, H, now);
        struct sched_item *it = sched_queue_peek(&q, now, aging, NULL, NULL, NULL);
        assert_non_null(it);
        if (it == &low.item) {
            served_at = i;
        }
        sched_queue_remove(&q, it);
    }
    /* low reaches high after 400 ms and is the oldest high then */
    assert_int_equal(served_at, 7);
    /* without aging it would wait for ever */
    memset(&q, 0, sizeof(q));
    sched_queue_push(&q, &low.item, L, T0);
    now = T0;
    for (int i = 0; i < 64; i++) {
        now += 50 * MS;
        sched_queue_push(&q, &hs[i].item, H, now);
        struct sched_item *it = sched_queue_peek(&q, now, 0, NULL, NULL, NULL);
        assert_ptr_not_equal(it, &low.item);
        sched_queue_remove(&q, it);
    }
    assert_int_equal(q.total, 1);
}

/* Peek does not remove; the same head comes back until removed. */
static void test_peek_is_stable(void **state)
{
    struct sched_queue q;
    struct thing a = { .name = "a" }, b = { .name = "b" };

    (void)state;
    memset(&q, 0, sizeof(q));
    assert_null(sched_queue_peek(&q, T0, 0, NULL, NULL, NULL));
    sched_queue_push(&q, &a.item, M, T0);
    sched_queue_push(&q, &b.item, H, T0 + MS);
    for (int i = 0; i < 3; i++) {
        assert_ptr_equal(sched_queue_peek(&q, T0 + 2 * MS, 0, NULL, NULL, NULL), &b.item);
    }
    assert_int_equal(q.total, 2);
    assert_int_equal(q.depth[H], 1);
    assert_int_equal(q.depth[M], 1);
}

/* ---- removal ---------------------------------------------------------------- */

static void test_remove_anywhere(void **state)
{
    static const struct {
        const char *remove;     /* names removed, in this order */
        const char *left;       /* what drains afterwards */
    } cases[] = {
        { "m2", "m1 m3 m4" },                   /* middle */
        { "m1", "m2 m3 m4" },                   /* head */
        { "m4", "m1 m2 m3" },                   /* tail */
        { "m2 m3", "m1 m4" },                   /* adjacent middles */
        { "m1 m4", "m2 m3" },                   /* both ends */
        { "m1 m2 m3 m4", "" },                  /* all */
        { "m3 m3", "m1 m2 m4" },                /* twice: the second is a no-op */
        { "m4 m1 m3 m2", "" },
    };

    (void)state;
    for (size_t c = 0; c < NELEM(cases); c++) {
        static const char *const names[] = { "m1", "m2", "m3", "m4" };
        struct sched_queue q;
        struct thing th[4];
        char buf[64], got[64];

        memset(&q, 0, sizeof(q));
        memset(th, 0, sizeof(th));
        for (int i = 0; i < 4; i++) {
            th[i].name = names[i];
            sched_queue_push(&q, &th[i].item, M, T0 + i * MS);
        }
        snprintf(buf, sizeof(buf), "%s", cases[c].remove);
        for (char *tok = strtok(buf, " "); tok; tok = strtok(NULL, " ")) {
            for (int i = 0; i < 4; i++) {
                if (strcmp(tok, names[i]) == 0) {
                    sched_queue_remove(&q, &th[i].item);
                    assert_false(th[i].item.queued);
                }
            }
            check_counts(&q);
        }
        drain(&q, T0 + 10 * MS, 0, got, sizeof(got));
        if (strcmp(got, cases[c].left) != 0) {
            fail_msg("remove \"%s\": left \"%s\", want \"%s\"", cases[c].remove, got,
                     cases[c].left);
        }
    }
}

/* Removed items can be queued again (a retry re-enters at its class). */
static void test_requeue_after_remove(void **state)
{
    struct sched_queue q;
    struct thing a = { .name = "a" }, b = { .name = "b" }, c = { .name = "c" };
    char got[64];

    (void)state;
    memset(&q, 0, sizeof(q));
    sched_queue_push(&q, &a.item, L, T0);
    sched_queue_push(&q, &b.item, L, T0 + MS);
    sched_queue_remove(&q, &a.item);
    sched_queue_push(&q, &c.item, L, T0 + 2 * MS);
    sched_queue_push(&q, &a.item, L, T0 + 3 * MS);    /* back at the end of its class */
    check_counts(&q);
    assert_int_equal(q.depth[L], 3);
    drain(&q, T0 + 4 * MS, 0, got, sizeof(got));
    assert_string_equal(got, "b c a");
}

/* ---- displacement ------------------------------------------------------------ */

static void test_victim_table(void **state)
{
    static const struct {
        struct push queued[8];
        int arrival;
        const char *victim;     /* NULL: none */
    } cases[] = {
        { { { NULL, 0, 0 } }, H, NULL },                                   /* empty */
        { { { "l1", L, 0 }, { "l2", L, 1 }, { "l3", L, 2 } }, H, "l3" },   /* newest low */
        { { { "l1", L, 0 }, { "l2", L, 1 }, { "l3", L, 2 } }, M, "l3" },
        { { { "l1", L, 0 }, { "l2", L, 1 } }, L, NULL },                   /* same class */
        { { { "m1", M, 0 }, { "m2", M, 1 } }, M, NULL },
        { { { "m1", M, 0 }, { "m2", M, 1 } }, L, NULL },                   /* higher class */
        { { { "m1", M, 0 }, { "m2", M, 1 } }, H, "m2" },
        { { { "h1", H, 0 }, { "h2", H, 1 } }, H, NULL },
        { { { "m1", M, 0 }, { "l1", L, 1 }, { "m2", M, 2 } }, H, "l1" },   /* lowest class first */
        { { { "l1", L, 0 }, { "m1", M, 1 }, { "l2", L, 2 }, { "m2", M, 3 } }, M, "l2" },
        { { { "h1", H, 0 }, { "m1", M, 1 }, { "h2", H, 2 } }, M, NULL },
        { { { "h1", H, 0 }, { "m1", M, 1 }, { "h2", H, 2 } }, H, "m1" },
        /* victim goes by the class asked for, not the aged class */
        { { { "l1", L, 0 }, { "m1", M, 100000 } }, H, "l1" },
    };

    (void)state;
    for (size_t c = 0; c < NELEM(cases); c++) {
        struct sched_queue q;
        struct thing th[8];

        memset(&q, 0, sizeof(q));
        memset(th, 0, sizeof(th));
        for (size_t i = 0; i < NELEM(cases[c].queued) && cases[c].queued[i].name; i++) {
            th[i].name = cases[c].queued[i].name;
            sched_queue_push(&q, &th[i].item, (enum prio)cases[c].queued[i].prio,
                             T0 + cases[c].queued[i].t_ms * MS);
        }
        struct thing *v = thing_of(sched_queue_victim(&q, (enum prio)cases[c].arrival));
        const char *got = v ? v->name : NULL;
        if ((got == NULL) != (cases[c].victim == NULL) ||
            (got && strcmp(got, cases[c].victim) != 0)) {
            fail_msg("case %zu: victim %s, want %s", c, got ? got : "none",
                     cases[c].victim ? cases[c].victim : "none");
        }
    }
}

/* The displacement as request.c does it: victim out, arrival in. */
static void test_displace_then_serve(void **state)
{
    struct sched_queue q;
    struct thing l1 = { .name = "l1" }, l2 = { .name = "l2" }, h = { .name = "h" };
    char got[64];

    (void)state;
    memset(&q, 0, sizeof(q));
    sched_queue_push(&q, &l1.item, L, T0);
    sched_queue_push(&q, &l2.item, L, T0 + MS);
    struct sched_item *v = sched_queue_victim(&q, H);
    assert_ptr_equal(v, &l2.item);
    sched_queue_remove(&q, v);
    sched_queue_push(&q, &h.item, H, T0 + 2 * MS);
    assert_int_equal(q.total, 2);
    assert_ptr_equal(sched_queue_victim(&q, H), &l1.item);
    drain(&q, T0 + 3 * MS, 0, got, sizeof(got));
    assert_string_equal(got, "h l1");
}

/* ---- against a reference model ----------------------------------------------- */

struct ref {
    struct thing th;
    int prio;
    int64_t t_enq;
    unsigned seq;
    bool in;
};

static int ref_class(const struct ref *r, int64_t now, int64_t aging)
{
    if (aging <= 0 || now <= r->t_enq) {
        return r->prio;
    }
    int64_t steps = (now - r->t_enq) / aging;
    return steps >= r->prio ? 0 : r->prio - (int)steps;
}

/* Better: lower class after aging; then earlier enqueue; then higher
 * original class; then earlier push. */
static bool ref_better(const struct ref *a, const struct ref *b, int64_t now, int64_t aging)
{
    int ca = ref_class(a, now, aging), cb = ref_class(b, now, aging);

    if (ca != cb) {
        return ca < cb;
    }
    if (a->t_enq != b->t_enq) {
        return a->t_enq < b->t_enq;
    }
    if (a->prio != b->prio) {
        return a->prio < b->prio;
    }
    return a->seq < b->seq;
}

static void test_random_against_model(void **state)
{
    enum { N = 200, STEPS = 20000 };
    static struct ref refs[N];
    struct sched_queue q;
    unsigned seed = 12345, seq = 0;
    int64_t now = T0;
    const int64_t aging = 300 * MS;

    (void)state;
    memset(&q, 0, sizeof(q));
    memset(refs, 0, sizeof(refs));
    for (int step = 0; step < STEPS; step++) {
        int op = rand_r(&seed) % 10;
        now += (rand_r(&seed) % 3) * 10 * MS;      /* often the same instant */
        struct ref *r = &refs[rand_r(&seed) % N];
        if (op < 5) {
            if (!r->in) {
                r->prio = rand_r(&seed) % PRIO_COUNT;
                r->t_enq = now;
                r->seq = seq++;
                r->in = true;
                sched_queue_push(&q, &r->th.item, (enum prio)r->prio, now);
            }
        } else if (op < 7) {
            if (r->in) {
                r->in = false;
                sched_queue_remove(&q, &r->th.item);
            }
        } else if (op < 9) {
            struct ref *best = NULL;
            for (int i = 0; i < N; i++) {
                if (refs[i].in && (!best || ref_better(&refs[i], best, now, aging))) {
                    best = &refs[i];
                }
            }
            struct sched_item *it = sched_queue_peek(&q, now, aging, NULL, NULL, NULL);
            if (!best) {
                assert_null(it);
                continue;
            }
            if (it != &best->th.item) {
                fail_msg("step %d: peek gave another item than the model", step);
            }
            best->in = false;
            sched_queue_remove(&q, it);
        } else {
            /* victim: the newest of the lowest class strictly lower than p */
            int p = rand_r(&seed) % PRIO_COUNT;
            struct ref *want = NULL;
            for (int c = PRIO_COUNT - 1; c > p && !want; c--) {
                for (int i = 0; i < N; i++) {
                    if (refs[i].in && refs[i].prio == c && (!want || refs[i].seq > want->seq)) {
                        want = &refs[i];
                    }
                }
            }
            struct sched_item *v = sched_queue_victim(&q, (enum prio)p);
            assert_ptr_equal(v, want ? &want->th.item : NULL);
        }
        if (step % 97 == 0) {
            check_counts(&q);
        }
    }
    check_counts(&q);
}

/* ---- queues by destination (sched_set) ------------------------------------- */

static void check_set(const struct sched_set *s)
{
    size_t total = 0, depth[PRIO_COUNT] = { 0 };

    for (unsigned g = 0; g < SCHED_GROUPS; g++) {
        if (!s->g[g].used) {
            assert_int_equal(s->g[g].q.total, 0);
            continue;
        }
        assert_true(s->g[g].q.total > 0);      /* an empty queue is given back */
        check_counts(&s->g[g].q);
        total += s->g[g].q.total;
        for (int p = 0; p < PRIO_COUNT; p++) {
            depth[p] += s->g[g].q.depth[p];
        }
    }
    assert_int_equal(total, s->total);
    for (int p = 0; p < PRIO_COUNT; p++) {
        assert_int_equal(depth[p], s->depth[p]);
    }
}

static const char *heads_str(const struct sched_set *s, int64_t now, int64_t aging, char *out,
                             size_t len)
{
    struct sched_item *heads[SCHED_GROUPS];
    size_t n = sched_set_heads(s, now, aging, NULL, NULL, heads, NULL);

    out[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        size_t k = strlen(out);
        snprintf(out + k, len - k, "%s%s", i ? " " : "", thing_of(heads[i])->name);
    }
    return out;
}

static void test_set_heads_table(void **state)
{
    static const struct {
        const char *what;
        struct { const char *name; uint64_t sig; int prio; int64_t t_ms; } pushes[8];
        int64_t now_ms, aging_ms;
        const char *heads;
    } cases[] = {
        { "one destination: one head, the best of its queue",
          { { "a", 1, L, 0 }, { "b", 1, H, 1 }, { "c", 1, M, 2 } }, 10, 0, "b" },
        { "a head per destination, best first",
          { { "a", 1, L, 0 }, { "b", 2, H, 1 }, { "c", 1, M, 2 }, { "d", 4, M, 3 } }, 10, 0,
          "b c d" },
        { "same class: the older head first",
          { { "x", 2, M, 5 }, { "y", 1, M, 3 }, { "z", 4, M, 4 } }, 10, 0, "y z x" },
        { "aging counts across destinations",
          { { "old", 1, L, 0 }, { "new", 2, M, 100 } }, 250, 200, "old new" },
        { "aging not yet: class first",
          { { "old", 1, L, 0 }, { "new", 2, M, 100 } }, 150, 200, "new old" },
        { "an aged low passes a new high",
          { { "h", 2, H, 500 }, { "l", 1, L, 0 } }, 600, 200, "l h" },
    };

    (void)state;
    for (size_t c = 0; c < NELEM(cases); c++) {
        struct sched_set s;
        struct thing th[8];
        char got[256];

        memset(&s, 0, sizeof(s));
        memset(th, 0, sizeof(th));
        for (size_t i = 0; i < NELEM(cases[c].pushes) && cases[c].pushes[i].name; i++) {
            th[i].name = cases[c].pushes[i].name;
            sched_set_push(&s, &th[i].item, cases[c].pushes[i].sig,
                           (enum prio)cases[c].pushes[i].prio, T0 + cases[c].pushes[i].t_ms * MS);
        }
        check_set(&s);
        heads_str(&s, T0 + cases[c].now_ms * MS, cases[c].aging_ms * MS, got, sizeof(got));
        if (strcmp(got, cases[c].heads) != 0) {
            fail_msg("%s: heads \"%s\", want \"%s\"", cases[c].what, got, cases[c].heads);
        }
    }
}

static void test_set_victim_and_remove(void **state)
{
    struct sched_set s;
    struct thing l1 = { .name = "l1" }, l2 = { .name = "l2" }, m = { .name = "m" },
                 h = { .name = "h" };

    (void)state;
    memset(&s, 0, sizeof(s));
    assert_null(sched_set_victim(&s, H));
    sched_set_push(&s, &l1.item, 1, L, T0);
    sched_set_push(&s, &l2.item, 2, L, T0 + MS);
    sched_set_push(&s, &m.item, 4, M, T0 + 2 * MS);
    sched_set_push(&s, &h.item, 1, H, T0 + 3 * MS);
    check_set(&s);
    assert_int_equal(s.total, 4);
    /* the newest of the lowest class, whatever its destination */
    assert_ptr_equal(sched_set_victim(&s, H), &l2.item);
    assert_ptr_equal(sched_set_victim(&s, M), &l2.item);
    assert_null(sched_set_victim(&s, L));
    sched_set_remove(&s, &l2.item);
    check_set(&s);
    assert_ptr_equal(sched_set_victim(&s, H), &l1.item);
    sched_set_remove(&s, &l1.item);
    assert_ptr_equal(sched_set_victim(&s, H), &m.item);
    assert_null(sched_set_victim(&s, M));
    sched_set_remove(&s, &l1.item);             /* twice: a no-op */
    check_set(&s);
    assert_int_equal(s.total, 2);
    sched_set_remove(&s, &m.item);
    sched_set_remove(&s, &h.item);
    check_set(&s);
    assert_int_equal(s.total, 0);
    for (unsigned g = 0; g < SCHED_GROUPS; g++) {
        assert_false(s.g[g].used);
    }
}

/* More destinations than queues: the rest share the last queue, and a
 * queue emptied is free for a new destination. */
static void test_set_overflow_and_reuse(void **state)
{
    enum { N = SCHED_GROUPS + 8 };
    static struct thing th[N];
    struct sched_set s;
    struct sched_item *heads[SCHED_GROUPS];

    (void)state;
    memset(&s, 0, sizeof(s));
    memset(th, 0, sizeof(th));
    for (int i = 0; i < N; i++) {
        th[i].name = "x";
        sched_set_push(&s, &th[i].item, (uint64_t)i + 1, M, T0 + i * MS);
    }
    check_set(&s);
    assert_int_equal(s.total, N);
    assert_int_equal(s.g[SCHED_GROUPS - 1].q.total, N - (SCHED_GROUPS - 1));
    assert_int_equal(sched_set_heads(&s, T0 + N * MS, 0, NULL, NULL, heads, NULL), SCHED_GROUPS);
    assert_ptr_equal(heads[0], &th[0].item);   /* the oldest first */
    /* free group 3, then a new destination takes it */
    sched_set_remove(&s, &th[3].item);
    check_set(&s);
    assert_false(s.g[th[3].item.group].used);
    struct thing extra = { .name = "extra" };
    sched_set_push(&s, &extra.item, 1000, H, T0 + N * MS);
    assert_int_equal(extra.item.group, 3);
    /* an existing destination keeps its queue even when a lower one is free */
    struct thing again = { .name = "again" };
    sched_set_remove(&s, &th[1].item);
    sched_set_push(&s, &again.item, 3, L, T0 + (N + 1) * MS);   /* th[2]'s destination */
    assert_int_equal(again.item.group, th[2].item.group);
    check_set(&s);
    for (int i = 0; i < N; i++) {
        sched_set_remove(&s, &th[i].item);
    }
    sched_set_remove(&s, &extra.item);
    sched_set_remove(&s, &again.item);
    check_set(&s);
    assert_int_equal(s.total, 0);
}

/* The set against a reference: heads[0] is the best item overall by class
 * after aging, then age; the victim is the newest of the lowest class. */
static void test_set_random_against_model(void **state)
{
    enum { N = 150, STEPS = 20000 };
    static struct ref refs[N];
    static uint64_t sigs[N];
    struct sched_set s;
    unsigned seed = 777, seq = 0;
    int64_t now = T0;
    const int64_t aging = 300 * MS;

    (void)state;
    memset(&s, 0, sizeof(s));
    memset(refs, 0, sizeof(refs));
    for (int step = 0; step < STEPS; step++) {
        int op = rand_r(&seed) % 10;
        now += (rand_r(&seed) % 3) * 10 * MS;
        int k = rand_r(&seed) % N;
        struct ref *r = &refs[k];
        if (op < 5) {
            if (!r->in) {
                r->prio = rand_r(&seed) % PRIO_COUNT;
                r->t_enq = now;
                r->seq = seq++;
                r->in = true;
                sigs[k] = 1 + (uint64_t)(rand_r(&seed) % 40);   /* > SCHED_GROUPS sets */
                sched_set_push(&s, &r->th.item, sigs[k], (enum prio)r->prio, now);
            }
        } else if (op < 7) {
            if (r->in) {
                r->in = false;
                sched_set_remove(&s, &r->th.item);
            }
        } else if (op < 9) {
            struct sched_item *heads[SCHED_GROUPS];
            size_t n = sched_set_heads(&s, now, aging, NULL, NULL, heads, NULL);
            struct ref *best = NULL;
            for (int i = 0; i < N; i++) {
                if (refs[i].in && (!best || ref_better(&refs[i], best, now, aging))) {
                    best = &refs[i];
                }
            }
            if (!best) {
                assert_int_equal(n, 0);
                continue;
            }
            assert_true(n > 0);
            struct ref *got = (struct ref *)thing_of(heads[0]);
            if (ref_class(got, now, aging) != ref_class(best, now, aging) ||
                got->t_enq != best->t_enq) {
                fail_msg("step %d: heads[0] class %d t %lld, best class %d t %lld", step,
                         ref_class(got, now, aging), (long long)got->t_enq,
                         ref_class(best, now, aging), (long long)best->t_enq);
            }
            for (size_t i = 1; i < n; i++) {
                int a = sched_effective(heads[i - 1], now, aging);
                int b = sched_effective(heads[i], now, aging);
                assert_true(a < b || (a == b && heads[i - 1]->t_enq_us <= heads[i]->t_enq_us));
            }
            got->in = false;
            sched_set_remove(&s, heads[0]);
        } else {
            int p = rand_r(&seed) % PRIO_COUNT;
            struct ref *want = NULL;
            for (int c = PRIO_COUNT - 1; c > p && !want; c--) {
                for (int i = 0; i < N; i++) {
                    if (refs[i].in && refs[i].prio == c && (!want || refs[i].t_enq > want->t_enq)) {
                        want = &refs[i];
                    }
                }
            }
            struct sched_item *v = sched_set_victim(&s, (enum prio)p);
            if (!want) {
                assert_null(v);
            } else {
                assert_non_null(v);
                assert_int_equal(((struct ref *)thing_of(v))->prio, want->prio);
                assert_int_equal(v->t_enq_us, want->t_enq);
            }
        }
        if (step % 97 == 0) {
            check_set(&s);
        }
    }
    check_set(&s);
}

/* ---- adaptive limit ----------------------------------------------------------- */

static void test_limit_init_and_slots(void **state)
{
    struct sched_limit l;

    (void)state;
    sched_limit_init(&l, 3, true);
    assert_int_equal(sched_limit_current(&l), 3);
    for (int i = 0; i < 3; i++) {
        assert_true(sched_limit_available(&l));
        sched_limit_acquire(&l);
    }
    assert_false(sched_limit_available(&l));
    assert_int_equal(l.inflight, 3);
    sched_limit_release(&l);
    assert_true(sched_limit_available(&l));
    sched_limit_release(&l);
    sched_limit_release(&l);
    sched_limit_release(&l);           /* one too many: stays at 0 */
    assert_int_equal(l.inflight, 0);
    assert_true(sched_limit_available(&l));
}

/* Feed N outcomes, the first OVER of them overloads, one ms apart from *T. */
static void feed(struct sched_limit *l, int n, int over, int64_t *t)
{
    for (int i = 0; i < n; i++) {
        sched_limit_feedback(l, i < over, T0 + (*t)++ * MS);
    }
}

/* A window of W outcomes: 30 % overloads cut the limit, 25 % do not. */
static void test_limit_window_cut(void **state)
{
    struct sched_limit l;
    int64_t t = 0;
    const int w = SCHED_WINDOW_SAMPLES;

    (void)state;
    sched_limit_init(&l, 20, true);
    feed(&l, w, w / 4, &t);                     /* 25 %: no cut; successes at max */
    assert_int_equal(sched_limit_current(&l), 20);
    feed(&l, w, w * 3 / 10, &t);                /* 30 %: 20 -> 14 (successes capped) */
    assert_int_equal(sched_limit_current(&l), 14);
    feed(&l, w - 1, w - 1, &t);                 /* window not closed yet */
    assert_int_equal(sched_limit_current(&l), 14);
    sched_limit_feedback(&l, true, T0 + t++ * MS);
    assert_int_equal(sched_limit_current(&l), 9);     /* 14 * 0.7 = 9.8 */
}

/* Never below 1, whatever the overload. */
static void test_limit_floor(void **state)
{
    struct sched_limit l;
    int64_t t = 0;

    (void)state;
    sched_limit_init(&l, 20, true);
    for (int w = 0; w < 30; w++) {
        feed(&l, SCHED_WINDOW_SAMPLES, SCHED_WINDOW_SAMPLES, &t);
    }
    assert_int_equal(sched_limit_current(&l), 1);
    assert_true(l.limit >= 1.0);
    assert_true(sched_limit_available(&l));
    sched_limit_acquire(&l);
    assert_false(sched_limit_available(&l));
}

/* Slow traffic: a window also closes after a second with 4 outcomes. */
static void test_limit_time_window(void **state)
{
    struct sched_limit l;

    (void)state;
    sched_limit_init(&l, 10, true);
    sched_limit_feedback(&l, true, T0);
    sched_limit_feedback(&l, true, T0 + 300 * MS);
    sched_limit_feedback(&l, true, T0 + 600 * MS);
    sched_limit_feedback(&l, true, T0 + 900 * MS);     /* 4 in 0.9 s: open */
    assert_int_equal(sched_limit_current(&l), 10);
    sched_limit_feedback(&l, false, T0 + 1100 * MS);   /* 5 in 1.1 s, 80 %: cut */
    assert_int_equal(sched_limit_current(&l), 7);
    /* three outcomes in a later second do not close a window */
    sched_limit_feedback(&l, true, T0 + 5000 * MS);
    sched_limit_feedback(&l, true, T0 + 6000 * MS);
    sched_limit_feedback(&l, true, T0 + 7000 * MS);
    assert_int_equal(sched_limit_current(&l), 7);
}

static void test_limit_increase_cap(void **state)
{
    struct sched_limit l;
    int64_t t = 0;

    (void)state;
    sched_limit_init(&l, 10, true);
    for (int w = 0; w < 3; w++) {
        feed(&l, SCHED_WINDOW_SAMPLES, SCHED_WINDOW_SAMPLES, &t);  /* 10 -> 7 -> 4.9 -> 3.43 */
    }
    assert_int_equal(sched_limit_current(&l), 3);
    /* +1/limit per success: about +1 per round of `limit` successes */
    double before = l.limit;
    sched_limit_feedback(&l, false, T0 + t++ * MS);
    assert_true(l.limit > before && l.limit - before < 0.3);
    int rounds = 1;
    while (sched_limit_current(&l) < 10 && rounds < 1000) {
        sched_limit_feedback(&l, false, T0 + t++ * MS);
        rounds++;
    }
    /* from 3.4 to 10 by 1/limit steps: sum of limits over the way, ~45 */
    assert_in_range(rounds, 30, 60);
    for (int i = 0; i < 1000; i++) {
        sched_limit_feedback(&l, false, T0 + t++ * MS);
    }
    assert_int_equal(sched_limit_current(&l), 10);     /* never above max */
    assert_true(l.limit <= 10.0);
}

/* A steady 20 % of random failures does not drag the limit down. */
static void test_limit_random_failures_hold(void **state)
{
    struct sched_limit l;
    unsigned short seed[3] = { 1, 2, 3 };
    double sum = 0;
    int n = 20000;

    (void)state;
    sched_limit_init(&l, 20, true);
    for (int i = 0; i < n; i++) {
        sched_limit_feedback(&l, erand48(seed) < 0.2, T0 + i * MS);
        sum += l.limit;
    }
    assert_true(sum / n >= 16.0);
    /* while a capacity overload (half the outcomes) does */
    for (int i = 0; i < 200; i++) {
        sched_limit_feedback(&l, i % 2 == 0, T0 + (n + i) * MS);
    }
    assert_true(sched_limit_current(&l) <= 8);
}

static void test_limit_not_adaptive(void **state)
{
    struct sched_limit l;

    (void)state;
    sched_limit_init(&l, 20, false);
    for (int i = 0; i < 50; i++) {
        sched_limit_feedback(&l, true, T0 + i * 300 * MS);
        assert_int_equal(sched_limit_current(&l), 20);
    }
    for (int i = 0; i < 50; i++) {
        sched_limit_feedback(&l, false, T0 + (20000 + i) * MS);
    }
    assert_int_equal(sched_limit_current(&l), 20);
}

/* A reload: a lower max clamps the limit, a higher max lets it grow back,
 * turning adaptive off resets the limit to max; in-flight counts stay. */
/* A cut starts from what was in flight when it overloaded, not from a limit far above it. */
static void test_limit_cut_from_peak(void **state)
{
    struct sched_limit l;

    (void)state;
    sched_limit_init(&l, 256, true);
    for (int i = 0; i < 50; i++) {
        sched_limit_acquire(&l);
    }
    for (int i = 0; i < SCHED_WINDOW_SAMPLES; i++) {
        sched_limit_feedback(&l, true, T0 + i * MS);
    }
    assert_int_equal(sched_limit_current(&l), 35); /* 50 * 0.7, not 256 * 0.7 */
    for (int i = 0; i < 50; i++) {
        sched_limit_release(&l);
    }
}

static void test_limit_configure(void **state)
{
    struct sched_limit l;

    (void)state;
    sched_limit_init(&l, 20, true);
    sched_limit_acquire(&l);
    sched_limit_acquire(&l);
    sched_limit_configure(&l, 8, true);
    assert_int_equal(sched_limit_current(&l), 8);
    assert_int_equal(l.inflight, 2);
    for (int i = 0; i < SCHED_WINDOW_SAMPLES; i++) {
        sched_limit_feedback(&l, true, T0 + i * MS);   /* one window: from the 2 in flight, 1.4 */
    }
    assert_int_equal(sched_limit_current(&l), 1);
    sched_limit_configure(&l, 30, true);               /* stays where it learnt */
    assert_int_equal(sched_limit_current(&l), 1);
    for (int i = 0; i < 2000; i++) {
        sched_limit_feedback(&l, false, T0 + (100 + i) * MS);
    }
    assert_int_equal(sched_limit_current(&l), 30);
    for (int i = 0; i < SCHED_WINDOW_SAMPLES; i++) {
        sched_limit_feedback(&l, true, T0 + 5 * SEC + i * MS);     /* 21 */
    }
    sched_limit_configure(&l, 30, false);
    assert_int_equal(sched_limit_current(&l), 30);
    assert_int_equal(l.inflight, 2);
    sched_limit_configure(&l, 1, false);
    assert_int_equal(sched_limit_current(&l), 1);
    assert_false(sched_limit_available(&l));           /* 2 in flight > 1 */

    /* an unreduced limit follows a raised maximum */
    sched_limit_init(&l, 10, true);
    sched_limit_configure(&l, 40, true);
    assert_int_equal(sched_limit_current(&l), 40);
    sched_limit_configure(&l, 10, true);
    assert_int_equal(sched_limit_current(&l), 10);
}

/* max_inflight 1: an overload keeps one slot. */
static void test_limit_one(void **state)
{
    struct sched_limit l;

    (void)state;
    sched_limit_init(&l, 1, true);
    for (int i = 0; i < 10; i++) {
        sched_limit_feedback(&l, true, T0 + i * SEC);
        assert_int_equal(sched_limit_current(&l), 1);
        assert_true(sched_limit_available(&l));
    }
    sched_limit_feedback(&l, false, T0 + 20 * SEC);
    assert_int_equal(sched_limit_current(&l), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_order_table),
        cmocka_unit_test(test_effective_table),
        cmocka_unit_test(test_aging_no_starvation),
        cmocka_unit_test(test_peek_is_stable),
        cmocka_unit_test(test_remove_anywhere),
        cmocka_unit_test(test_requeue_after_remove),
        cmocka_unit_test(test_victim_table),
        cmocka_unit_test(test_displace_then_serve),
        cmocka_unit_test(test_random_against_model),
        cmocka_unit_test(test_set_heads_table),
        cmocka_unit_test(test_set_victim_and_remove),
        cmocka_unit_test(test_set_overflow_and_reuse),
        cmocka_unit_test(test_set_random_against_model),
        cmocka_unit_test(test_limit_init_and_slots),
        cmocka_unit_test(test_limit_window_cut),
        cmocka_unit_test(test_limit_floor),
        cmocka_unit_test(test_limit_time_window),
        cmocka_unit_test(test_limit_increase_cap),
        cmocka_unit_test(test_limit_random_failures_hold),
        cmocka_unit_test(test_limit_not_adaptive),
        cmocka_unit_test(test_limit_cut_from_peak),
        cmocka_unit_test(test_limit_configure),
        cmocka_unit_test(test_limit_one),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
