/*
 * conf: the configuration of one dsgate process.
 *
 * A YAML file (libyaml) or the built-in defaults become one immutable
 * struct conf.  Every key of ../shared/design.md is described by a table in
 * conf.c (name, type, bounds, default, reloadable).  Problems are collected
 * in one pass and reported as "file:line:col: key.path: problem (got "v")".
 * A reload builds a new struct conf and swaps it in only when it validates.
 */
#ifndef DSGATE_CONF_H
#define DSGATE_CONF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum prio { PRIO_HIGH = 0, PRIO_MEDIUM = 1, PRIO_LOW = 2, PRIO_COUNT = 3 };

enum jitter { JITTER_FULL, JITTER_EQUAL, JITTER_DECORRELATED, JITTER_NONE };

enum routing { ROUTING_FAILOVER, ROUTING_WEIGHTED };

enum log_level { LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG };

enum log_format { LOG_FORMAT_JSON, LOG_FORMAT_TEXT };

enum compat_reasoning { COMPAT_REASONING_OFF, COMPAT_REASONING_RESTORE };

struct conf_model {
    char *from; /* name the client uses */
    char *to;   /* name sent to this upstream */
};

struct conf_upstream {
    char *name;
    char *url;         /* base URL, no trailing slash */
    char *api_key_env; /* variable holding the key; may be "" */
    int max_inflight;  /* 1..10000 */
    bool adaptive;
    int weight; /* 1..1000 */
    struct conf_model *models;
    size_t nmodels;
    int64_t connect_ms;    /* timeouts.connect, > 0 */
    int64_t first_data_ms; /* timeouts.first_data, 0: none */
    int64_t idle_ms;       /* timeouts.idle, 0: none */
    int64_t total_ms;      /* timeouts.total, 0: none */
    int64_t body_ms;       /* timeouts.body: a non-stream answer's first byte to its end, 0: none */
    int64_t hedge_after_ms; /* timeouts.hedge_after, 0: no hedging */
    char *ca_file;         /* "" : system store */
    bool insecure;         /* skip TLS verification; loopback only */
    /*
     * The APIs it takes requests in (DIALECT_BIT of enum dialect_id): as
     * listed, or by default [openai, anthropic] for api.deepseek.com and
     * [openai] for any other host (a local vLLM or Ollama).
     */
    unsigned dialects;
    unsigned dialects_listed; /* upstreams[].dialects as the file says; 0: not given */
};

enum over_limit { OVER_LIMIT_QUEUE, OVER_LIMIT_REJECT };

struct conf_client {
    char *name;      /* in metrics, logs, /clients; "client<N>" when not given */
    char *token_env; /* variable holding the client token; "": a tokenless client (see clients.h) */
    enum prio priority;
    int weight;               /* 1..1000: its share inside its class */
    int max_inflight;         /* 0: no cap */
    int64_t rpm;              /* 0: no limit */
    int64_t tpm;              /* 0: no limit */
    int64_t tokens_per_day;   /* 0: no budget */
    enum over_limit over_limit;
    int64_t max_tokens_default; /* the completion estimate when the body names none */
};

#define CONF_MAX_RETRY_STATUS 16

struct conf {
    char *file; /* file loaded, or NULL for built-in */

    char *listen;       /* "host:port" */
    char *admin_listen; /* "" : none */

    struct conf_upstream *upstreams;
    size_t nupstreams; /* >= 1 */
    enum routing routing;

    struct {
        int64_t max_queued; /* 0..1000000 */
        int64_t max_wait_ms;
        int64_t class_max_wait_ms[PRIO_COUNT]; /* max_wait_by_class; 0: max_wait */
        enum prio default_priority;
        int64_t aging_ms; /* 0: no aging */
    } queue;

    struct {
        int max_attempts; /* 1..20, including the first */
        int64_t base_ms;
        int64_t cap_ms;
        enum jitter jitter;
        int on_status[CONF_MAX_RETRY_STATUS];
        size_t non_status;
        bool on_connect;
        bool on_timeout;
        double budget; /* 0..10 */
    } retry;

    struct {
        bool enabled;
        int64_t ttl_ms;
        int64_t max_entries; /* memory.max_entries, 0: memory tier off */
        int64_t max_bytes;   /* memory.max_bytes */
        char *redis_url;     /* "" : memory only */
        char *redis_prefix;
        int64_t redis_timeout_ms;
        bool shared;
        char **paths;
        size_t npaths;
    } cache;

    struct {
        enum compat_reasoning reasoning_content; /* restore: see compat.h */
        int64_t max_entries;   /* memory.max_entries: remembered tool call ids */
        int64_t max_bytes;     /* memory.max_bytes */
        int64_t max_reasoning; /* a longer reasoning is not remembered */
    } compat;

    struct {
        char *redis; /* "" : fleet mode off */
        int64_t lease_ttl_ms;
        int fallback_instances; /* 1..1000 */
    } fleet;

    struct conf_client *clients;
    size_t nclients;

    struct {
        int64_t max_body;
        int64_t max_headers;
        int64_t max_connections;
        int64_t header_timeout_ms;
        int64_t body_timeout_ms;
        int64_t idle_timeout_ms;
    } limits;

    struct {
        int64_t after_ms; /* 0: off */
        int64_t every_ms;
    } keepalive;

    int64_t shutdown_timeout_ms;

    struct {
        enum log_level level;
        enum log_format format;
        char *file; /* "" : stderr */
    } log;
};

/* How long a request of class P may wait in all (queue.max_wait_by_class, else max_wait). */
int64_t conf_max_wait_ms(const struct conf *c, enum prio p);

/*
 * Built-in defaults (design.md): listen 127.0.0.1:8080, one upstream
 * "deepseek" at https://api.deepseek.com, memory cache only.
 * The caller owns the result (conf_free).
 */
struct conf *conf_defaults(void);

/*
 * Parse YAML text.  NAME is used in messages ("dsgate.yaml:14:5: ...").
 * Returns a new conf (caller owns) or NULL; *ERR receives a malloc'd,
 * newline-separated list of every problem (NULL when there is none).
 * Environment overrides are not applied here.
 */
struct conf *conf_parse(const char *name, const char *text, size_t len, char **err);

/*
 * Read and parse FILE, then apply the environment overrides
 * (DSGATE_LISTEN, DSGATE_UPSTREAM, DSGATE_REDIS_URL).  FILE NULL: the
 * built-in defaults plus overrides.  Same ownership as conf_parse.
 */
struct conf *conf_load(const char *file, char **err);

/* Apply DSGATE_* overrides to C; 0 or -1 with *ERR set. */
int conf_apply_env(struct conf *c, char **err);

void conf_free(struct conf *c);

/* "250ms" "5s" "2m" "24h" "0" -> milliseconds; 0 or -1. */
int conf_parse_duration(const char *s, int64_t *ms);

/* "512" "64KB" "8MB" "1GB" -> bytes (KB = 1024); 0 or -1. */
int conf_parse_size(const char *s, int64_t *bytes);

/* "high" "medium" "low", case-insensitive; 0 or -1. */
int conf_parse_priority(const char *s, enum prio *p);

const char *conf_priority_name(enum prio p);

/*
 * "host:port" or "[v6]:port" (port 0..65535, 0: any free port) -> HOST
 * (without brackets, at most HOSTLEN - 1 bytes) and *PORT; 0 or -1.
 */
int conf_parse_hostport(const char *s, char *host, size_t hostlen, int *port);

/*
 * A reload may not change the keys that need a restart (listen,
 * admin_listen, fleet.redis).  0 when NEXT keeps them as in OLD, else -1
 * with *ERR (malloc'd, caller frees) naming each changed key.
 */
int conf_check_reload(const struct conf *old, const struct conf *next, char **err);

#endif
