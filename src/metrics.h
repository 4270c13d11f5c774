/*
 * metrics: counters, gauges and histograms, rendered in the Prometheus
 * text exposition format for GET /metrics.
 *
 * A series is a metric name plus a label set given as one string
 * ("code=\"200\",priority=\"high\"").  Series are found by hash; the number
 * of series is bounded (METRICS_MAX_SERIES): past it, new series are
 * dropped and counted in dsgate_metrics_dropped_total.
 */
#ifndef DSGATE_METRICS_H
#define DSGATE_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define METRICS_MAX_SERIES 4096

struct evbuffer;

enum metric_type { METRIC_COUNTER, METRIC_GAUGE, METRIC_HISTOGRAM };

/* Describe a metric family once, before use (HELP/TYPE lines). */
void metrics_register(const char *name, enum metric_type type, const char *help);

/* LABELS may be "" or NULL for none. */
void metrics_add(const char *name, const char *labels, double v);
void metrics_set(const char *name, const char *labels, double v);
void metrics_observe(const char *name, const char *labels, double v);

/* printf-style label helpers for the common one/two/three-label cases */
void metrics_addf(const char *name, double v, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void metrics_setf(const char *name, double v, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * A series handle, for hot paths that update the same series again and
 * again: found once, then updated without formatting or hashing.  NULL
 * when the series limit is reached (the update functions accept NULL).
 * Handles stay valid until metrics_free().
 */
struct metric_series;
struct metric_series *metrics_series(const char *name, const char *labels);
void metrics_series_add(struct metric_series *s, double v);
void metrics_series_observe(struct metric_series *s, double v);

/* Render everything. */
void metrics_render(struct evbuffer *out);

/* Register the families of design.md. */
void metrics_init(void);
void metrics_free(void);

#endif
