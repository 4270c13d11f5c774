/*
 * sched: the class queue with aging and the adaptive concurrency limit
 * (see sched.h).  Both are plain data structures with no I/O, so the unit
 * tests drive them with a fake clock.
 */
#include "sched.h"

#include <stddef.h>

/* Does item A go before item B (same class)? */
static bool
item_before(const struct sched_item *a, const struct sched_item *b)
{
    return a->tag < b->tag || (a->tag == b->tag && a->t_enq_us < b->t_enq_us);
}

static void
flow_unlink(struct sched_queue *q, enum prio p, struct sched_item *h)
{
    if (h->fprev) {
        h->fprev->fnext = h->fnext;
    } else {
        q->flows[p] = h->fnext;
    }
    if (h->fnext) {
        h->fnext->fprev = h->fprev;
    }
    h->fprev = h->fnext = NULL;
}

/* Head H into its class's flows by its place: few flows, walked from the front. */
static void
flow_link(struct sched_queue *q, enum prio p, struct sched_item *h)
{
    struct sched_item *after = NULL;

    for (struct sched_item *x = q->flows[p]; x && !item_before(h, x); x = x->fnext) {
        after = x;
    }
    h->fprev = after;
    h->fnext = after ? after->fnext : q->flows[p];
    if (h->fnext) {
        h->fnext->fprev = h;
    }
    if (after) {
        after->fnext = h;
    } else {
        q->flows[p] = h;
    }
}

void
sched_queue_push(struct sched_queue *q, struct sched_item *it, enum prio p, int64_t now_us)
{
    struct sched_item *h = q->flows[p];

    it->prio = p;
    it->t_enq_us = now_us;
    it->t_in_us = now_us;
    if (!it->tagged) {
        it->tag = 0; /* untagged: FIFO by arrival */
    }
    it->fprev = it->fnext = it->ftail = NULL;
    while (h && h->flow_key != it->flow_key) {
        h = h->fnext;
    }
    if (!h) {
        it->prev = it->next = NULL;
        it->ftail = it;
        flow_link(q, p, it);
    } else {
        /* one that comes back keeps its place: after the last one that goes before it */
        struct sched_item *after = h->ftail;
        while (after && item_before(it, after)) {
            after = after->prev;
        }
        it->prev = after;
        it->next = after ? after->next : h;
        if (it->next) {
            it->next->prev = it;
        } else {
            h->ftail = it;
        }
        if (after) {
            after->next = it;
        } else {
            /* the flow's new head takes over its place among the flows */
            it->ftail = h->ftail;
            h->ftail = NULL;
            flow_unlink(q, p, h);
            flow_link(q, p, it);
        }
    }
    q->depth[p]++;
    q->total++;
    it->queued = true;
}

void
sched_queue_remove(struct sched_queue *q, struct sched_item *it)
{
    enum prio p = it->prio;

    if (!it->queued) {
        return;
    }
    if (!it->prev) {
        struct sched_item *next = it->next;
        flow_unlink(q, p, it);
        if (next) {
            next->prev = NULL;
            next->ftail = it->ftail;
            flow_link(q, p, next);
        }
    } else {
        if (!it->next) {
            struct sched_item *h = it->prev;
            while (h->prev) {
                h = h->prev; /* the last one leaves: its flow's head must know */
            }
            h->ftail = it->prev;
        } else {
            it->next->prev = it->prev;
        }
        it->prev->next = it->next;
    }
    it->prev = it->next = it->ftail = NULL;
    it->queued = false;
    q->depth[p]--;
    q->total--;
}

enum prio
sched_effective(const struct sched_item *it, int64_t now_us, int64_t aging_us)
{
    int cls = (int)it->prio;

    if (aging_us > 0 && now_us > it->t_enq_us) {
        int64_t steps = (now_us - it->t_enq_us) / aging_us;
        cls = steps >= cls ? 0 : cls - (int)steps;
    }
    return (enum prio)cls;
}

/*
 * Each class serves its first unblocked flow's head; the class counts as
 * aged by its oldest unblocked request (a flow's head is its oldest), so a
 * class whose requests have waited long moves up whoever goes first in it.
 * The best class goes; ties go to the class whose oldest waited longest.
 */
struct sched_item *
sched_queue_peek(const struct sched_queue *q, int64_t now_us, int64_t aging_us,
                 sched_blocked_fn blocked, void *arg, enum prio *cls_out)
{
    struct sched_item *best = NULL;
    int64_t best_old = 0;
    enum prio best_cls = PRIO_COUNT;

    for (int p = 0; p < PRIO_COUNT; p++) {
        struct sched_item *first = NULL;
        int64_t oldest = 0;
        for (struct sched_item *h = q->flows[p]; h; h = h->fnext) {
            if (blocked && blocked(h, arg)) {
                continue;
            }
            if (!first) {
                first = h;
                oldest = h->t_enq_us;
            } else if (h->t_enq_us < oldest) {
                oldest = h->t_enq_us;
            }
        }
        if (!first) {
            continue;
        }
        struct sched_item probe = {.prio = (enum prio)p, .t_enq_us = oldest};
        enum prio cls = sched_effective(&probe, now_us, aging_us);
        if (!best || cls < best_cls || (cls == best_cls && oldest < best_old)) {
            best = first;
            best_cls = cls;
            best_old = oldest;
        }
    }
    if (cls_out) {
        *cls_out = best_cls;
    }
    return best;
}

/* The last item of class C: the last of the flow whose last goes latest (a flood's newest). */
static struct sched_item *
class_last(const struct sched_queue *q, int c)
{
    struct sched_item *last = NULL;

    for (struct sched_item *h = q->flows[c]; h; h = h->fnext) {
        if (!last || item_before(last, h->ftail)) {
            last = h->ftail;
        }
    }
    return last;
}

struct sched_item *
sched_queue_victim(const struct sched_queue *q, enum prio p)
{
    for (int c = PRIO_COUNT - 1; c > (int)p; c--) {
        struct sched_item *t = class_last(q, c);
        if (t) {
            return t;
        }
    }
    return NULL;
}

void
sched_set_tag(struct sched_set *s, struct sched_item *it, enum prio p, double *finish, int weight)
{
    double start = *finish > s->vtime[p] ? *finish : s->vtime[p];

    it->tag = start;
    it->tagged = true;
    *finish = start + 1.0 / (weight > 0 ? weight : 1);
}

void
sched_set_served(struct sched_set *s, const struct sched_item *it)
{
    if (it->tagged && it->tag > s->vtime[it->prio]) {
        s->vtime[it->prio] = it->tag;
    }
}

void
sched_set_push(struct sched_set *s, struct sched_item *it, uint64_t sig, enum prio p,
               int64_t now_us)
{
    sched_set_push_at(s, it, sig, p, now_us, now_us);
}

void
sched_set_push_at(struct sched_set *s, struct sched_item *it, uint64_t sig, enum prio p,
                  int64_t t_enq_us, int64_t now_us)
{
    unsigned gi = SCHED_GROUPS - 1, free_gi = SCHED_GROUPS;

    for (unsigned i = 0; i < SCHED_GROUPS; i++) {
        if (s->g[i].used && s->g[i].sig == sig) {
            free_gi = i;
            break;
        }
        if (!s->g[i].used && free_gi == SCHED_GROUPS) {
            free_gi = i;
        }
    }
    if (free_gi < SCHED_GROUPS) {
        gi = free_gi;
    }
    if (!s->g[gi].used) {
        s->g[gi].used = true;
        s->g[gi].sig = sig;
    }
    it->group = gi;
    sched_queue_push(&s->g[gi].q, it, p, t_enq_us);
    it->t_in_us = now_us;
    s->total++;
    s->depth[p]++;
}

void
sched_set_remove(struct sched_set *s, struct sched_item *it)
{
    if (!it->queued) {
        return;
    }
    struct sched_queue *q = &s->g[it->group].q;
    s->total--;
    s->depth[it->prio]--;
    sched_queue_remove(q, it);
    if (q->total == 0) {
        s->g[it->group].used = false; /* free for another destination */
    }
}

size_t
sched_set_heads(const struct sched_set *s, int64_t now_us, int64_t aging_us,
                sched_blocked_fn blocked, void *arg, struct sched_item **out, enum prio *cls_out)
{
    size_t n = 0;
    enum prio cls_of[SCHED_GROUPS];

    for (unsigned i = 0; i < SCHED_GROUPS; i++) {
        enum prio cls;
        struct sched_item *h = s->g[i].used ? sched_queue_peek(&s->g[i].q, now_us, aging_us,
                                                               blocked, arg, &cls)
                                            : NULL;
        if (!h) {
            continue;
        }
        /* insertion sort: few queues */
        size_t j = n++;
        while (j > 0) {
            enum prio oc = cls_of[j - 1];
            if (oc < cls || (oc == cls && out[j - 1]->t_enq_us <= h->t_enq_us)) {
                break;
            }
            out[j] = out[j - 1];
            cls_of[j] = cls_of[j - 1];
            j--;
        }
        out[j] = h;
        cls_of[j] = cls;
    }
    if (cls_out) {
        for (size_t i = 0; i < n; i++) {
            cls_out[i] = cls_of[i];
        }
    }
    return n;
}

struct sched_item *
sched_set_victim(const struct sched_set *s, enum prio p)
{
    for (int c = PRIO_COUNT - 1; c > (int)p; c--) {
        struct sched_item *best = NULL;
        for (unsigned i = 0; i < SCHED_GROUPS; i++) {
            struct sched_item *t = s->g[i].used ? class_last(&s->g[i].q, c) : NULL;
            if (t && (!best || item_before(best, t))) {
                best = t;
            }
        }
        if (best) {
            return best;
        }
    }
    return NULL;
}

void
sched_limit_init(struct sched_limit *l, int max_inflight, bool adaptive)
{
    l->max_inflight = max_inflight;
    l->adaptive = adaptive;
    l->limit = max_inflight;
    l->inflight = 0;
    l->win_start_us = 0;
    l->win_n = l->win_over = 0;
    l->win_peak = l->last_peak = 0;
    l->baseline_us = 0;
    l->sample_us = 0;
    l->nsamples = 0;
}

void
sched_limit_configure(struct sched_limit *l, int max_inflight, bool adaptive)
{
    /* an unreduced limit follows the new maximum; a reduced one keeps its level */
    bool at_max = l->limit >= l->max_inflight;
    l->max_inflight = max_inflight;
    l->adaptive = adaptive;
    if (!adaptive || at_max || l->limit > max_inflight) {
        l->limit = max_inflight;
    }
}

bool
sched_limit_available(const struct sched_limit *l)
{
    return l->inflight < sched_limit_current(l);
}

void
sched_limit_acquire(struct sched_limit *l)
{
    l->inflight++;
    if (l->inflight > l->win_peak) {
        l->win_peak = l->inflight;
    }
}

void
sched_limit_release(struct sched_limit *l)
{
    if (l->inflight > 0) {
        l->inflight--;
    }
}

bool
sched_limit_feedback(struct sched_limit *l, bool overload, int64_t now_us)
{
    if (!l->adaptive) {
        return false;
    }
    if (l->win_n == 0) {
        l->win_start_us = now_us;
    }
    l->win_n++;
    int peak = l->win_peak > l->last_peak ? l->win_peak : l->last_peak;
    if (overload) {
        l->win_over++;
    } else {
        l->limit += 1.0 / l->limit;
        if (l->limit > l->max_inflight) {
            l->limit = l->max_inflight;
        }
    }
    bool closed = l->win_n >= SCHED_WINDOW_SAMPLES ||
                  (l->win_n >= SCHED_MIN_SAMPLES &&
                   now_us - l->win_start_us >= (int64_t)SCHED_WINDOW_MS * 1000);
    if (!closed) {
        return false;
    }
    bool cut = (uint64_t)l->win_over * 100 >= (uint64_t)l->win_n * SCHED_OVERLOAD_PERCENT;
    if (cut) {
        /* from what was in flight when it overloaded, not from a limit far above it */
        double base = peak > 0 && peak < l->limit ? peak : l->limit;
        l->limit = base * SCHED_DECREASE_FACTOR;
        if (l->limit < 1) {
            l->limit = 1;
        }
    }
    l->win_n = l->win_over = 0;
    l->last_peak = l->win_peak;
    l->win_peak = l->inflight;
    return cut;
}

bool
sched_limit_sample(struct sched_limit *l, int64_t first_data_us)
{
    double x = (double)first_data_us;

    l->sample_us = first_data_us;
    if (l->nsamples < 8) {
        /* learn the baseline from the first few samples, their mean */
        l->nsamples++;
        l->baseline_us += (x - l->baseline_us) / l->nsamples;
        return false;
    }
    bool queued = x > l->baseline_us * SCHED_QUEUED_RATIO &&
                  x > l->baseline_us + SCHED_QUEUED_MARGIN_MS * 1000.0;
    /* slowly refreshed: queued samples move it only a little, so a model that became slower is learnt */
    l->baseline_us += (x - l->baseline_us) / (queued ? 512.0 : 32.0);
    return queued;
}

int
sched_limit_current(const struct sched_limit *l)
{
    int n = (int)l->limit;

    return n < 1 ? 1 : n;
}
