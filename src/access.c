/*
 * access: the end of a request as data (enum req_end and its table), the
 * access-log line and the request metrics for every request, proxied or
 * refused.
 */
#include <stdio.h>
#include <string.h>

#include <event2/buffer.h>

#include "access.h"
#include "conf.h"
#include "dialect.h"
#include "http.h"
#include "log.h"
#include "metrics.h"

const struct end_info req_end_info[END_COUNT] = {
    [END_NONE] = {"completed", WHO_NONE, AT_STREAM},
    [END_COMPLETED] = {"completed", WHO_NONE, AT_STREAM},
    [END_CACHE_HIT] = {"cache_hit", WHO_NONE, AT_LOOKUP},
    [END_COALESCED] = {"coalesced", WHO_NONE, AT_REPLAY},
    [END_COALESCED_FAILED] = {"coalesced_failed", WHO_UPSTREAM, AT_REPLAY},
    [END_CIRCUIT_OPEN] = {"circuit_open", WHO_UPSTREAM, AT_QUEUE},
    [END_UNKNOWN_MODEL] = {"unknown_model", WHO_CLIENT, AT_ADMIT},
    [END_NO_DIALECT] = {"no_dialect", WHO_GATEWAY, AT_ADMIT},
    [END_QUEUE_FULL] = {"queue_full", WHO_GATEWAY, AT_ADMIT},
    [END_QUEUE_DISPLACED] = {"queue_displaced", WHO_GATEWAY, AT_QUEUE},
    [END_QUEUE_TIMEOUT] = {"queue_timeout", WHO_GATEWAY, AT_QUEUE},
    [END_CLIENT_LIMITED] = {"client_limited", WHO_CLIENT, AT_ADMIT},
    [END_CLIENT_QUEUED] = {"client_closed_queued", WHO_CLIENT, AT_QUEUE},
    [END_CLIENT_BACKOFF] = {"client_closed_backoff", WHO_CLIENT, AT_BACKOFF},
    [END_CLIENT_WAITING] = {"client_closed_waiting", WHO_CLIENT, AT_ATTEMPT},
    [END_CLIENT_STREAMING] = {"client_closed_streaming", WHO_CLIENT, AT_STREAM},
    [END_CLIENT_CLOSED] = {"client_closed", WHO_CLIENT, AT_ATTEMPT},
    [END_UP_UNREACHABLE] = {"upstream_unreachable", WHO_UPSTREAM, AT_ATTEMPT},
    [END_UP_TIMEOUT] = {"upstream_timeout", WHO_UPSTREAM, AT_ATTEMPT},
    [END_UP_IDLE] = {"upstream_idle", WHO_UPSTREAM, AT_STREAM},
    [END_UP_RESET] = {"upstream_reset", WHO_UPSTREAM, AT_STREAM},
    [END_UP_ERROR] = {"upstream_error", WHO_UPSTREAM, AT_STREAM},
    [END_SHUTDOWN] = {"shutdown", WHO_GATEWAY, AT_ATTEMPT},
    [END_INTERNAL] = {"internal_error", WHO_GATEWAY, AT_ADMIT},
    [END_REFUSED] = {"refused", WHO_GATEWAY, AT_ADMIT},
};

static const char *const cache_names[CS_COUNT] = {"none", "miss", "hit", "bypass"};

const char *
cache_status_name(enum cache_status c)
{
    return (unsigned)c < CS_COUNT ? cache_names[c] : "none";
}

static const char *
end_label(const struct access_rec *a)
{
    if (a->end == END_REFUSED && a->code) {
        return a->code;
    }
    return (unsigned)a->end < END_COUNT ? req_end_info[a->end].label : "completed";
}

static void
access_log(const struct access_rec *a, int64_t now)
{
    struct evbuffer *b;
    int64_t unknown[TOK_KINDS] = {-1, -1, -1, -1, -1};
    const int64_t *t = a->tokens ? a->tokens : unknown;

    if (!log_enabled(LOG_INFO) || !(b = evbuffer_new())) {
        return;
    }
    evbuffer_add_printf(b, "{\"id\":%llu,\"method\":\"", (unsigned long long)a->id);
    log_json_escape(b, a->method);
    evbuffer_add_printf(b, "\",\"path\":\"");
    log_json_escape(b, a->path);
    evbuffer_add_printf(
        b,
        "\",\"status\":%d,\"priority\":\"%s\",\"cache\":\"%s\","
        "\"upstream\":\"%s\",\"attempts\":%d,\"queue_ms\":%lld,"
        "\"upstream_ms\":%lld,\"first_data_ms\":%lld,\"total_ms\":%lld,"
        "\"bytes_in\":%zu,\"bytes_out\":%llu,\"tokens_prompt\":%lld,"
        "\"tokens_completion\":%lld,\"tokens_cache_hit\":%lld,\"reasoning_restored\":%d,"
        "\"end\":\"%s\"",
        a->status, conf_priority_name(a->prio), cache_status_name(a->cache), a->upstream,
        a->attempts, (long long)a->queue_ms, (long long)a->upstream_ms,
        (long long)a->first_data_ms, (long long)((now - a->t_start_us) / 1000), a->bytes_in,
        (unsigned long long)a->bytes_out, (long long)t[TOK_PROMPT], (long long)t[TOK_COMPLETION],
        (long long)t[TOK_CACHE_HIT], a->reasoning_restored, end_label(a));
    if (a->client) {
        evbuffer_add_printf(b, ",\"client\":\"");
        log_json_escape(b, a->client);
        evbuffer_add_printf(b, "\"");
    }
    evbuffer_add_printf(b, "}");
    size_t len = evbuffer_get_length(b);
    log_access((const char *)evbuffer_pullup(b, -1), len);
    evbuffer_free(b);
}

static void
count_request(const struct access_rec *a, int64_t now)
{
    /* series handles by (code, priority, cache): formatted once each */
    static struct {
        int code;
        enum prio prio;
        enum cache_status cache;
        struct metric_series *s;
    } seen[256];
    static struct metric_series *duration;
    int code = a->status ? a->status : 499;
    unsigned h = ((unsigned)code * 31u + (unsigned)a->prio * 7u + (unsigned)a->cache) % 256u;

    if (!(seen[h].s && seen[h].code == code && seen[h].prio == a->prio &&
          seen[h].cache == a->cache)) {
        char labels[96];
        snprintf(labels, sizeof(labels), "code=\"%d\",priority=\"%s\",cache=\"%s\"", code,
                 conf_priority_name(a->prio), cache_status_name(a->cache));
        seen[h].code = code;
        seen[h].prio = a->prio;
        seen[h].cache = a->cache;
        seen[h].s = metrics_series("dsgate_requests_total", labels);
    }
    metrics_series_add(seen[h].s, 1);
    if (a->client) {
        /* few clients, few codes: by name, formatted each time */
        metrics_addf("dsgate_client_requests_total", 1, "client=\"%s\",code=\"%d\"", a->client,
                     code);
    }
    if (!duration) {
        duration = metrics_series("dsgate_request_duration_seconds", NULL);
    }
    metrics_series_observe(duration, (double)(now - a->t_start_us) / 1e6);
}

void
access_note(const struct access_rec *a)
{
    int64_t now = http_now_us();

    access_log(a, now);
    count_request(a, now);
}
