/*
 * metrics: a small registry of Prometheus series (see metrics.h).
 *
 * Families keep their series in insertion order so that the exposition
 * groups each family's samples under one HELP/TYPE header, as the format
 * requires.  Histogram buckets span LLM latencies: 5 ms to 10 minutes.
 */
#include "metrics.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#define MAX_FAMILIES 64
#define HASH_SIZE    8192

static const double buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                 2.5,   5,    10,    30,   60,  120,  300, 600};
#define NBUCKETS (sizeof(buckets) / sizeof(buckets[0]))

struct metric_series {
    struct metric_series *hnext; /* hash chain */
    struct metric_series *fnext; /* family order */
    const struct family *fam;
    char *labels;
    double value;              /* counter/gauge value, or histogram sum */
    uint64_t count;            /* histogram */
    uint64_t bucket[NBUCKETS]; /* histogram, non-cumulative */
};

struct family {
    const char *name;
    const char *help;
    enum metric_type type;
    struct metric_series *first, *last;
};

static struct family families[MAX_FAMILIES];
static size_t nfamilies;
static struct metric_series *table[HASH_SIZE];
static size_t nseries;
static uint64_t dropped;

void
metrics_register(const char *name, enum metric_type type, const char *help)
{
    for (size_t i = 0; i < nfamilies; i++) {
        if (strcmp(families[i].name, name) == 0) {
            return;
        }
    }
    if (nfamilies < MAX_FAMILIES) {
        families[nfamilies++] = (struct family){name, help, type, NULL, NULL};
    }
}

static struct family *
family_find(const char *name)
{
    for (size_t i = 0; i < nfamilies; i++) {
        if (strcmp(families[i].name, name) == 0) {
            return &families[i];
        }
    }
    return NULL;
}

static uint32_t
hash2(const char *a, const char *b)
{
    uint32_t h = 2166136261u;

    for (; *a; a++) {
        h = (h ^ (unsigned char)*a) * 16777619u;
    }
    h = (h ^ '{') * 16777619u;
    for (; *b; b++) {
        h = (h ^ (unsigned char)*b) * 16777619u;
    }
    return h;
}

static struct metric_series *
series_get(const char *name, const char *labels)
{
    if (!labels) {
        labels = "";
    }
    uint32_t h = hash2(name, labels) % HASH_SIZE;
    for (struct metric_series *s = table[h]; s; s = s->hnext) {
        if (strcmp(s->fam->name, name) == 0 && strcmp(s->labels, labels) == 0) {
            return s;
        }
    }
    struct family *f = family_find(name);
    if (!f || nseries >= METRICS_MAX_SERIES) {
        dropped++;
        return NULL;
    }
    struct metric_series *s = calloc(1, sizeof(*s));
    if (!s || !(s->labels = strdup(labels))) {
        free(s);
        dropped++;
        return NULL;
    }
    s->fam = f;
    s->hnext = table[h];
    table[h] = s;
    if (f->last) {
        f->last->fnext = s;
    } else {
        f->first = s;
    }
    f->last = s;
    nseries++;
    return s;
}

struct metric_series *
metrics_series(const char *name, const char *labels)
{
    return series_get(name, labels);
}

void
metrics_series_add(struct metric_series *s, double v)
{
    if (s) {
        s->value += v;
    }
}

void
metrics_series_observe(struct metric_series *s, double v)
{
    if (!s) {
        return;
    }
    s->value += v;
    s->count++;
    for (size_t i = 0; i < NBUCKETS; i++) {
        if (v <= buckets[i]) {
            s->bucket[i]++;
            break;
        }
    }
}

void
metrics_add(const char *name, const char *labels, double v)
{
    metrics_series_add(series_get(name, labels), v);
}

void
metrics_set(const char *name, const char *labels, double v)
{
    struct metric_series *s = series_get(name, labels);

    if (s) {
        s->value = v;
    }
}

void
metrics_observe(const char *name, const char *labels, double v)
{
    metrics_series_observe(series_get(name, labels), v);
}

void
metrics_addf(const char *name, double v, const char *fmt, ...)
{
    char labels[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(labels, sizeof(labels), fmt, ap);
    va_end(ap);
    metrics_add(name, labels, v);
}

void
metrics_setf(const char *name, double v, const char *fmt, ...)
{
    char labels[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(labels, sizeof(labels), fmt, ap);
    va_end(ap);
    metrics_set(name, labels, v);
}

static void
sample(struct evbuffer *out, const char *name, const char *suffix, const char *labels,
       const char *extra, double v)
{
    bool any = (labels && *labels) || (extra && *extra);

    evbuffer_add_printf(out, "%s%s", name, suffix);
    if (any) {
        evbuffer_add_printf(out, "{%s%s%s}", labels ? labels : "",
                            labels && *labels && extra && *extra ? "," : "", extra ? extra : "");
    }
    evbuffer_add_printf(out, " %.17g\n", v);
}

void
metrics_render(struct evbuffer *out)
{
    static const char *const type_names[] = {"counter", "gauge", "histogram"};

    for (size_t i = 0; i < nfamilies; i++) {
        const struct family *f = &families[i];
        if (!f->first) {
            continue;
        }
        evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", f->name, f->help, f->name,
                            type_names[f->type]);
        for (const struct metric_series *s = f->first; s; s = s->fnext) {
            if (f->type != METRIC_HISTOGRAM) {
                sample(out, f->name, "", s->labels, NULL, s->value);
                continue;
            }
            uint64_t cum = 0;
            char le[32];
            for (size_t b = 0; b < NBUCKETS; b++) {
                cum += s->bucket[b];
                snprintf(le, sizeof(le), "le=\"%g\"", buckets[b]);
                sample(out, f->name, "_bucket", s->labels, le, (double)cum);
            }
            sample(out, f->name, "_bucket", s->labels, "le=\"+Inf\"", (double)s->count);
            sample(out, f->name, "_sum", s->labels, NULL, s->value);
            sample(out, f->name, "_count", s->labels, NULL, (double)s->count);
        }
    }
    evbuffer_add_printf(out,
                        "# HELP dsgate_metrics_dropped_total Series not recorded because the "
                        "series limit was reached.\n"
                        "# TYPE dsgate_metrics_dropped_total counter\n"
                        "dsgate_metrics_dropped_total %llu\n",
                        (unsigned long long)dropped);
}

void
metrics_init(void)
{
    metrics_register("dsgate_requests_total", METRIC_COUNTER,
                     "Requests answered, by status code, priority and cache result.");
    metrics_register("dsgate_request_duration_seconds", METRIC_HISTOGRAM,
                     "Time from the first byte of a request to the end of its reply.");
    metrics_register("dsgate_upstream_attempts_total", METRIC_COUNTER,
                     "Attempts sent upstream, by upstream and outcome.");
    metrics_register("dsgate_retries_total", METRIC_COUNTER,
                     "Retries scheduled, by upstream and reason.");
    metrics_register("dsgate_retry_budget_exhausted_total", METRIC_COUNTER,
                     "Retries refused because the retry budget was spent.");
    metrics_register("dsgate_queue_depth", METRIC_GAUGE, "Requests waiting, by priority.");
    metrics_register("dsgate_queue_wait_seconds", METRIC_HISTOGRAM,
                     "Time requests spent waiting in the queue.");
    metrics_register("dsgate_queue_rejected_total", METRIC_COUNTER,
                     "Requests refused or displaced by the queue, by reason.");
    metrics_register("dsgate_inflight", METRIC_GAUGE, "Transfers in flight, by upstream.");
    metrics_register("dsgate_concurrency_limit", METRIC_GAUGE,
                     "Current (adaptive) concurrency limit, by upstream.");
    metrics_register("dsgate_hedges_total", METRIC_COUNTER,
                     "Hedged attempts, by the hedge's upstream and outcome (won, lost, cancelled).");
    metrics_register("dsgate_first_data_baseline_seconds", METRIC_GAUGE,
                     "Baseline time to the first data byte of streams, by upstream.");
    metrics_register("dsgate_first_data_sample_seconds", METRIC_GAUGE,
                     "Latest time to the first data byte of a stream, by upstream.");
    metrics_register("dsgate_cache_hits_total", METRIC_COUNTER, "Cache hits, by tier.");
    metrics_register("dsgate_cache_misses_total", METRIC_COUNTER, "Cache misses.");
    metrics_register("dsgate_cache_stores_total", METRIC_COUNTER, "Responses stored, by tier.");
    metrics_register("dsgate_cache_errors_total", METRIC_COUNTER,
                     "Cache tier errors (Redis down, slow, full or garbled), by tier.");
    metrics_register("dsgate_redis_errors_total", METRIC_COUNTER,
                     "Redis connection errors, by link (cache, fleet) and kind.");
    metrics_register("dsgate_compat_restored_total", METRIC_COUNTER,
                     "Requests sent upstream with remembered reasoning_content put back into their "
                     "assistant messages (one per request, however many messages).");
    metrics_register("dsgate_coalesced_total", METRIC_COUNTER,
                     "Requests answered by an identical request in flight.");
    metrics_register("dsgate_circuit_open", METRIC_GAUGE,
                     "1 when the upstream's circuit is open, by upstream.");
    metrics_register("dsgate_fleet_fallback", METRIC_GAUGE,
                     "1 while fleet Redis is unreachable and local fallback limits apply.");
    metrics_register("dsgate_fleet_leases_held", METRIC_GAUGE,
                     "Fleet leases held by this instance (in use or granted), by upstream.");
    metrics_register("dsgate_fleet_lease_wait_seconds", METRIC_HISTOGRAM,
                     "Round trip of a fleet lease request.");
    metrics_register("dsgate_fleet_limit", METRIC_GAUGE,
                     "Fleet-wide adaptive concurrency limit last seen, by upstream.");
    metrics_register("dsgate_fleet_coalesced_total", METRIC_COUNTER,
                     "Requests answered from the shared cache after another instance's call.");
    metrics_register("dsgate_tokens_total", METRIC_COUNTER,
                     "Tokens reported by the upstream in usage, by upstream and kind.");
    metrics_register("dsgate_client_requests_total", METRIC_COUNTER,
                     "Requests ended, by client and status code.");
    metrics_register("dsgate_client_tokens_total", METRIC_COUNTER,
                     "Tokens of the client's answers' usage, by client and kind.");
    metrics_register("dsgate_client_inflight", METRIC_GAUGE,
                     "Upstream transfers of the client's requests now.");
    metrics_register("dsgate_client_queued", METRIC_GAUGE, "The client's requests queued now.");
    metrics_register("dsgate_client_throttled_total", METRIC_COUNTER,
                     "Requests held back or refused by a limit of their client, by reason "
                     "(max_inflight, rpm, tpm, tokens_per_day); once per request and reason.");
    metrics_register("dsgate_client_budget_remaining_tokens", METRIC_GAUGE,
                     "Tokens left of the client's tokens_per_day today (reservations count).");
}

void
metrics_free(void)
{
    for (size_t i = 0; i < HASH_SIZE; i++) {
        for (struct metric_series *s = table[i], *n; s; s = n) {
            n = s->hnext;
            free(s->labels);
            free(s);
        }
        table[i] = NULL;
    }
    for (size_t i = 0; i < nfamilies; i++) {
        families[i].first = families[i].last = NULL;
    }
    nseries = 0;
}
