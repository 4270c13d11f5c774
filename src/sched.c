/*
 * sched: the class queue with aging and the adaptive concurrency limit
 * (see sched.h).  Both are plain data structures with no I/O, so the unit
 * tests drive them with a fake clock.
 */
#include "sched.h"

#include <stddef.h>

void
sched_queue_push(struct sched_queue *q, struct sched_item *it, enum prio p, int64_t now_us)
{
    struct sched_item *after = q->tail[p];

    it->prio = p;
    it->t_enq_us = now_us;
    it->t_in_us = now_us;
    /* one that comes back keeps its place: after the last one that came before it */
    while (after && after->t_enq_us > now_us) {
        after = after->prev;
    }
    it->prev = after;
    it->next = after ? after->next : q->head[p];
    if (it->next) {
        it->next->prev = it;
    } else {
        q->tail[p] = it;
    }
    if (after) {
        after->next = it;
    } else {
        q->head[p] = it;
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
    if (it->prev) {
        it->prev->next = it->next;
    } else {
        q->head[p] = it->next;
    }
    if (it->next) {
        it->next->prev = it->prev;
    } else {
        q->tail[p] = it->prev;
    }
    it->prev = it->next = NULL;
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
 * The head of each class is its oldest item and so the most promoted one;
 * the best of the three heads is the best overall.  Ties go to the item
 * that has waited longest.
 */
struct sched_item *
sched_queue_peek(const struct sched_queue *q, int64_t now_us, int64_t aging_us)
{
    struct sched_item *best = NULL;
    enum prio best_cls = PRIO_COUNT;

    for (int p = 0; p < PRIO_COUNT; p++) {
        struct sched_item *h = q->head[p];
        if (!h) {
            continue;
        }
        enum prio cls = sched_effective(h, now_us, aging_us);
        if (!best || cls < best_cls || (cls == best_cls && h->t_enq_us < best->t_enq_us)) {
            best = h;
            best_cls = cls;
        }
    }
    return best;
}

struct sched_item *
sched_queue_victim(const struct sched_queue *q, enum prio p)
{
    for (int c = PRIO_COUNT - 1; c > (int)p; c--) {
        if (q->tail[c]) {
            return q->tail[c];
        }
    }
    return NULL;
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
                struct sched_item **out)
{
    size_t n = 0;

    for (unsigned i = 0; i < SCHED_GROUPS; i++) {
        struct sched_item *h = s->g[i].used ? sched_queue_peek(&s->g[i].q, now_us, aging_us) : NULL;
        if (!h) {
            continue;
        }
        /* insertion sort: few queues */
        enum prio cls = sched_effective(h, now_us, aging_us);
        size_t j = n++;
        while (j > 0) {
            enum prio oc = sched_effective(out[j - 1], now_us, aging_us);
            if (oc < cls || (oc == cls && out[j - 1]->t_enq_us <= h->t_enq_us)) {
                break;
            }
            out[j] = out[j - 1];
            j--;
        }
        out[j] = h;
    }
    return n;
}

struct sched_item *
sched_set_victim(const struct sched_set *s, enum prio p)
{
    for (int c = PRIO_COUNT - 1; c > (int)p; c--) {
        struct sched_item *best = NULL;
        for (unsigned i = 0; i < SCHED_GROUPS; i++) {
            struct sched_item *t = s->g[i].used ? s->g[i].q.tail[c] : NULL;
            if (t && (!best || t->t_enq_us > best->t_enq_us)) {
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
