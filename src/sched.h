/*
 * sched: who goes upstream next.
 *
 * A queue of waiting requests by class (high, medium, low), with aging: a
 * class moves up one step for every `aging` period its oldest request has
 * waited, so low never starves.  The queue knows nothing of requests; it
 * links struct sched_item that the caller embeds.
 *
 * Inside a class, requests are served by start-time fair queuing (SFQ,
 * Goyal et al.) across flows (the caller's clients, FLOW): a request gets
 * the tag max(V, F) where V is the class's virtual time (the tag of the
 * last request served) and F its flow's previous tag + 1/weight
 * (sched_set_tag); the lowest tag goes first, FIFO within a flow.  So
 * backlogged flows share in proportion to their weights, a flow that
 * floods only pushes its own tags ahead, and a flow that was idle starts
 * at V, with no credit saved up.  SFQ rather than deficit round robin:
 * the cost of a request is not known when it is chosen, its tag is fixed
 * at arrival (a request that comes back from a backoff keeps its place),
 * and an idle flow costs nothing (flows exist only while they hold items).
 * A flow the caller says is blocked (its client is at a cap or out of
 * quota) is passed over, so it holds no one else up.
 *
 * And a concurrency limiter per upstream: at most `limit` transfers in
 * flight.  With adaptive limits: each success raises the limit by 1/limit
 * (about +1 per round of successes) up to max_inflight; overload signals
 * (429, 503, 504, timeouts) are judged by their share of the outcomes in
 * a window (SCHED_WINDOW_SAMPLES outcomes, or SCHED_WINDOW_MS with at least
 * SCHED_MIN_SAMPLES): when they are SCHED_OVERLOAD_PERCENT or more, the
 * limit is cut by SCHED_DECREASE_FACTOR, never below 1.  An upstream that
 * is over its capacity fails a growing share of requests; one that fails a
 * steady small share at random does not shrink the limit for nothing.
 *
 * An upstream that holds requests instead of failing them (DeepSeek: 200,
 * then keep-alives while the request waits in its own queue) is judged by
 * two more overload signals: keep-alives before the first data byte (the
 * caller reports them as overload), and a time to first data well above a
 * slowly refreshed baseline (sched_limit_sample; the gradient idea of
 * Gradient2/Vegas): a sample over SCHED_QUEUED_RATIO x the baseline and
 * SCHED_QUEUED_MARGIN_MS above it counts as overload and does not teach
 * the baseline.  The caller gives samples of streams only, where the first
 * data byte is the first token, not the whole answer, so slow (reasoning,
 * long) answers do not shrink the limit.
 */
#ifndef DSGATE_SCHED_H
#define DSGATE_SCHED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"

#define SCHED_DECREASE_FACTOR  0.7
#define SCHED_WINDOW_SAMPLES   40
#define SCHED_WINDOW_MS        1000
#define SCHED_MIN_SAMPLES      4
#define SCHED_OVERLOAD_PERCENT 30
#define SCHED_QUEUED_RATIO     2.0
#define SCHED_QUEUED_MARGIN_MS 500

/*
 * A flow's items of one class of one queue are a list; the first of each
 * such list (the flow's head) also links the class's flows, by their
 * heads' tags, and knows its flow's last item: no allocation, and a flow
 * exists only while it holds items.
 */
struct sched_item {
    struct sched_item *prev, *next; /* in its flow, by (tag, t_enq_us) */
    struct sched_item *fprev, *fnext; /* a flow's head: the class's flows */
    struct sched_item *ftail;         /* a flow's head: its flow's last item */
    enum prio prio;   /* class at enqueue */
    int64_t t_enq_us; /* its place: FIFO order within the flow, and aging */
    int64_t t_in_us;  /* when it entered this time (its wait) */
    bool queued;
    bool tagged;        /* tag is set (sched_set_tag): it keeps it when it comes back */
    double tag;         /* SFQ start tag */
    const void *flow_key; /* the caller's flow (client); NULL: one flow for all */
    unsigned group; /* in a sched_set: which queue */
};

struct sched_queue {
    struct sched_item *flows[PRIO_COUNT]; /* the flows' heads, first to serve first */
    size_t depth[PRIO_COUNT];
    size_t total;
};

/* Is the flow of IT (its head) blocked now?  NULL: none is. */
typedef bool (*sched_blocked_fn)(const struct sched_item *it, void *arg);

void sched_queue_push(struct sched_queue *q, struct sched_item *it, enum prio p, int64_t now_us);
void sched_queue_remove(struct sched_queue *q, struct sched_item *it);
/*
 * The item to serve next (not removed), with aging; NULL when empty or
 * every flow is blocked.  *CLS (may be NULL): the class it counts as.
 */
struct sched_item *sched_queue_peek(const struct sched_queue *q, int64_t now_us, int64_t aging_us,
                                    sched_blocked_fn blocked, void *arg, enum prio *cls);
/* The class an item counts as now, after aging. */
enum prio sched_effective(const struct sched_item *it, int64_t now_us, int64_t aging_us);
/* The newest item of a class strictly lower than P (for displacement); NULL if none. */
struct sched_item *sched_queue_victim(const struct sched_queue *q, enum prio p);

/*
 * Queues by destination: requests that can use the same set of upstreams
 * (SIG, a bit per upstream) share a queue, so a request is never held
 * behind one that waits for a different, busy upstream.  Past
 * SCHED_GROUPS distinct sets, the rest share the last queue.
 */
#define SCHED_GROUPS 32

struct sched_set {
    struct {
        uint64_t sig;
        bool used;
        struct sched_queue q;
    } g[SCHED_GROUPS];
    size_t total;
    size_t depth[PRIO_COUNT];
    double vtime[PRIO_COUNT]; /* SFQ virtual time of each class */
};

/*
 * Tag IT of class P for its flow: FINISH is the flow's last finish tag in
 * that class (the caller keeps it), WEIGHT its weight.  Once per request.
 */
void sched_set_tag(struct sched_set *s, struct sched_item *it, enum prio p, double *finish,
                   int weight);
/* IT (tagged) goes upstream now: the class's virtual time moves to its tag. */
void sched_set_served(struct sched_set *s, const struct sched_item *it);

void sched_set_push(struct sched_set *s, struct sched_item *it, uint64_t sig, enum prio p,
                    int64_t now_us);
/*
 * The same, for an item that comes back: it takes its place by T_ENQ_US
 * (its first arrival) among those of its class; NOW_US starts its wait.
 */
void sched_set_push_at(struct sched_set *s, struct sched_item *it, uint64_t sig, enum prio p,
                       int64_t t_enq_us, int64_t now_us);
void sched_set_remove(struct sched_set *s, struct sched_item *it);
/* The next item of every non-empty queue, best first (class after aging, then age). */
size_t sched_set_heads(const struct sched_set *s, int64_t now_us, int64_t aging_us,
                       sched_blocked_fn blocked, void *arg, struct sched_item **out,
                       enum prio *cls);
/* The newest item of the lowest class below P across all queues; NULL if none. */
struct sched_item *sched_set_victim(const struct sched_set *s, enum prio p);

struct sched_limit {
    int max_inflight;
    bool adaptive;
    double limit;
    int inflight;
    int64_t win_start_us; /* the current window of outcomes */
    uint32_t win_n;
    uint32_t win_over;
    int win_peak;  /* most in flight during the window */
    int last_peak; /* ... during the window before */
    /* time to first data of streams: baseline and the latest sample, in us */
    double baseline_us;
    int64_t sample_us;
    uint32_t nsamples;
};

void sched_limit_init(struct sched_limit *l, int max_inflight, bool adaptive);
/* Apply a new configuration (reload); keeps in-flight counts. */
void sched_limit_configure(struct sched_limit *l, int max_inflight, bool adaptive);
bool sched_limit_available(const struct sched_limit *l);
void sched_limit_acquire(struct sched_limit *l);
void sched_limit_release(struct sched_limit *l);
/*
 * OVERLOAD: the upstream answered 429/503/504 or timed out; else a
 * success.  Returns true when this outcome closed a window that cut the
 * limit.
 */
bool sched_limit_feedback(struct sched_limit *l, bool overload, int64_t now_us);
int sched_limit_current(const struct sched_limit *l);
/*
 * A successful stream's time to its first data byte.  Returns true when
 * it counts as overload (the upstream queued it); the caller then feeds
 * that to sched_limit_feedback().  Always recorded (baseline, latest).
 */
bool sched_limit_sample(struct sched_limit *l, int64_t first_data_us);

#endif
