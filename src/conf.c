/*
 * conf: YAML configuration -> struct conf.
 *
 * Every key dsgate understands is one row of a table below: name, type,
 * where it is stored, bounds, default (as YAML text) and whether a SIGHUP
 * reload may change it.  The same rows give the built-in defaults
 * (conf_defaults), drive the walk over the libyaml document tree
 * (conf_parse) and free the result (conf_free).  The walk never stops at the
 * first problem: each one is appended to a list as
 * "file:line:col: key.path: problem (got "value")", libyaml's 0-based marks
 * plus one.  Cross-field rules (duplicate upstream names, `insecure` only
 * towards loopback, retry.cap >= retry.base, ...) run in the same pass.
 * Keys hold the NAMES of environment variables; their values are never
 * printed, and user:password@ in URLs is masked in messages.
 */
#include "conf.h"
#include "dialect.h"
#include "route.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

#define MS_S INT64_C(1000)
#define MS_M (60 * MS_S)
#define MS_H (60 * MS_M)
#define MS_D (24 * MS_H)
#define KB   INT64_C(1024)
#define MB   (1024 * KB)
#define GB   (1024 * MB)

#define CONF_MAX_FILE   (1024 * 1024) /* a config larger than this is a mistake */
#define CONF_MAX_ERRORS 100           /* then "further errors not shown" */
#define CONF_PATH       256           /* longest key path in a message */

enum conf_type {
    CT_STR,      /* char *, malloc'd, "" when empty or null */
    CT_BOOL,     /* bool: true | false */
    CT_INT,      /* int in [min, max] */
    CT_I64,      /* int64_t in [min, max] */
    CT_DUR,      /* int64_t milliseconds in [min, max] */
    CT_SIZE,     /* int64_t bytes in [min, max] */
    CT_DOUBLE,   /* double in [min, max] */
    CT_ENUM,     /* enum stored as int: index into names, any case */
    CT_MAP,      /* nested keys, stored in the same base struct */
    CT_LIST,     /* list of maps -> array of `size` bytes, count at noff */
    CT_STRLIST,  /* list of strings -> char **, count at noff */
    CT_MODELS,   /* map name -> name -> struct conf_model[], count at noff */
    CT_RETRY_ON, /* retry.on: status codes, "connect", "timeout" */
    CT_DIALECTS, /* upstreams[].dialects: names of enum dialect_id -> unsigned bits */
};

#define CK_REQUIRED 0x01 /* a list item must set it */
#define CK_NORELOAD 0x02 /* a reload may not change it: restart needed */
#define CK_NONEMPTY 0x04 /* a string that may not be "" */
#define CK_SECRET   0x08 /* a URL that may hold user:password@: mask it */
#define CK_ONE_ITEM 0x10 /* CT_LIST: built-in default is one item */

struct conf_ctx;

struct conf_key {
    const char *name;
    enum conf_type type;
    size_t off;                                       /* value, or array, within the base struct */
    int64_t min, max;                                 /* bounds; lists: number of entries */
    const char *def;                                  /* default as YAML text; lists: words */
    unsigned flags;                                   /* CK_* */
    const struct conf_key *sub;                       /* CT_MAP, CT_LIST: the keys inside */
    size_t noff;                                      /* lists: count within the base struct */
    size_t size;                                      /* CT_LIST: size of one item */
    const char *const *names;                         /* CT_ENUM: names in enum order */
    int (*check)(const char *s, char *why, size_t n); /* strings */
    void (*item)(struct conf_ctx *x, void *items, size_t i, yaml_node_t *map,
                 const char *path); /* CT_LIST */
};

/* One parse: where messages go and what they name. */
struct conf_ctx {
    const char *name;
    yaml_document_t *doc;
    char *err;
    size_t len;
    int nerr;
};

static int conf_check_listen(const char *s, char *why, size_t n);
static int conf_check_admin(const char *s, char *why, size_t n);
static int conf_check_url(const char *s, char *why, size_t n);
static int conf_check_redis(const char *s, char *why, size_t n);
static int conf_check_env(const char *s, char *why, size_t n);
static int conf_check_name(const char *s, char *why, size_t n);
static int conf_check_client_name(const char *s, char *why, size_t n);
static int conf_check_path(const char *s, char *why, size_t n);
static void conf_check_upstream(struct conf_ctx *x, void *items, size_t i, yaml_node_t *map,
                                const char *path);
static void conf_check_client(struct conf_ctx *x, void *items, size_t i, yaml_node_t *map,
                              const char *path);
static void conf_upstream_dialects(struct conf_upstream *u);

static const char *const conf_prio_names[] = {"high", "medium", "low", NULL};
static const char *const conf_jitter_names[] = {"full", "equal", "decorrelated", "none", NULL};
static const char *const conf_routing_names[] = {"failover", "weighted", NULL};
static const char *const conf_level_names[] = {"error", "warn", "info", "debug", NULL};
static const char *const conf_format_names[] = {"json", "text", NULL};
static const char *const conf_compat_reasoning_names[] = {"off", "restore", NULL};
static const char *const conf_over_limit_names[] = {"queue", "reject", NULL};

/* ---- the table: every key of design.md, with its bounds and default ---- */

#define KEY(n, t, o, lo, hi, d)                                                                    \
    .name = (n), .type = (t), .off = (o), .min = (lo), .max = (hi), .def = (d)
#define C(f)  offsetof(struct conf, f)
#define U(f)  offsetof(struct conf_upstream, f)
#define CL(f) offsetof(struct conf_client, f)

static const struct conf_key conf_timeout_keys[] = {
    {KEY("connect", CT_DUR, U(connect_ms), 1, 5 * MS_M, "5s")},
    {KEY("first_data", CT_DUR, U(first_data_ms), 0, MS_D, "600s")}, /* 0: none */
    {KEY("idle", CT_DUR, U(idle_ms), 0, MS_D, "120s")},             /* 0: none */
    {KEY("total", CT_DUR, U(total_ms), 0, MS_D, "0")},              /* 0: none */
    {KEY("body", CT_DUR, U(body_ms), 0, MS_D, "600s")},             /* 0: none */
    {KEY("hedge_after", CT_DUR, U(hedge_after_ms), 0, MS_D, "0")},  /* 0: off */
    {.name = NULL},
};

/* In a file, name and url are required; the defaults make the built-in one. */
static const struct conf_key conf_upstream_keys[] = {
    {KEY("name", CT_STR, U(name), 0, 0, "deepseek"), .flags = CK_REQUIRED | CK_NONEMPTY,
     .check = conf_check_name},
    {KEY("url", CT_STR, U(url), 0, 0, "https://api.deepseek.com"), .flags = CK_REQUIRED | CK_SECRET,
     .check = conf_check_url},
    {KEY("api_key_env", CT_STR, U(api_key_env), 0, 0, "DEEPSEEK_API_KEY"), .check = conf_check_env},
    {KEY("max_inflight", CT_INT, U(max_inflight), 1, 10000, "32")},
    {KEY("adaptive", CT_BOOL, U(adaptive), 0, 0, "true")},
    {KEY("weight", CT_INT, U(weight), 1, 1000, "1")},
    {KEY("models", CT_MODELS, U(models), 0, 1000, ""), .noff = U(nmodels)},
    {KEY("timeouts", CT_MAP, 0, 0, 0, NULL), .sub = conf_timeout_keys},
    {KEY("ca_file", CT_STR, U(ca_file), 0, 0, "")},
    {KEY("insecure", CT_BOOL, U(insecure), 0, 0, "false")},
    /* "": by the url's host (conf_upstream_dialects) */
    {KEY("dialects", CT_DIALECTS, U(dialects_listed), 1, DIALECTS, "")},
    {.name = NULL},
};

static const struct conf_key conf_class_wait_keys[] = {
    {KEY("high", CT_DUR, C(queue.class_max_wait_ms[PRIO_HIGH]), 0, MS_D, "0")}, /* 0: max_wait */
    {KEY("medium", CT_DUR, C(queue.class_max_wait_ms[PRIO_MEDIUM]), 0, MS_D, "0")},
    {KEY("low", CT_DUR, C(queue.class_max_wait_ms[PRIO_LOW]), 0, MS_D, "0")},
    {.name = NULL},
};

static const struct conf_key conf_keepalive_keys[] = {
    {KEY("after", CT_DUR, C(keepalive.after_ms), 0, MS_H, "2s")}, /* 0: off */
    {KEY("every", CT_DUR, C(keepalive.every_ms), 100, MS_M, "3s")},
    {.name = NULL},
};

static const struct conf_key conf_queue_keys[] = {
    {KEY("max_queued", CT_I64, C(queue.max_queued), 0, 1000000, "10000")},
    {KEY("max_wait", CT_DUR, C(queue.max_wait_ms), 1, MS_D, "300s")},
    {KEY("max_wait_by_class", CT_MAP, 0, 0, 0, NULL), .sub = conf_class_wait_keys},
    {KEY("default_priority", CT_ENUM, C(queue.default_priority), 0, 0, "medium"),
     .names = conf_prio_names},
    {KEY("aging", CT_DUR, C(queue.aging_ms), 0, MS_D, "30s")}, /* 0: off */
    {.name = NULL},
};

static const struct conf_key conf_retry_keys[] = {
    {KEY("max_attempts", CT_INT, C(retry.max_attempts), 1, 20, "5")},
    {KEY("base", CT_DUR, C(retry.base_ms), 1, 10 * MS_M, "1s")},
    {KEY("cap", CT_DUR, C(retry.cap_ms), 1, MS_H, "30s")},
    {KEY("jitter", CT_ENUM, C(retry.jitter), 0, 0, "full"), .names = conf_jitter_names},
    {KEY("on", CT_RETRY_ON, 0, 0, CONF_MAX_RETRY_STATUS + 2,
         "429 500 502 503 504 529 connect timeout")},
    {KEY("budget", CT_DOUBLE, C(retry.budget), 0, 10, "0.5")},
    {.name = NULL},
};

static const struct conf_key conf_memory_keys[] = {
    {KEY("max_entries", CT_I64, C(cache.max_entries), 0, 10000000, "1024")},
    {KEY("max_bytes", CT_SIZE, C(cache.max_bytes), 0, 64 * GB, "64MB")},
    {.name = NULL},
};

static const struct conf_key conf_redis_keys[] = {
    {KEY("url", CT_STR, C(cache.redis_url), 0, 0, ""), .flags = CK_SECRET,
     .check = conf_check_redis},
    {KEY("prefix", CT_STR, C(cache.redis_prefix), 0, 0, "dsgate:")},
    {KEY("timeout", CT_DUR, C(cache.redis_timeout_ms), 1, 10 * MS_S, "50ms")},
    {.name = NULL},
};

static const struct conf_key conf_cache_keys[] = {
    {KEY("enabled", CT_BOOL, C(cache.enabled), 0, 0, "true")},
    {KEY("ttl", CT_DUR, C(cache.ttl_ms), MS_S, 365 * MS_D, "24h")},
    {KEY("memory", CT_MAP, 0, 0, 0, NULL), .sub = conf_memory_keys},
    {KEY("redis", CT_MAP, 0, 0, 0, NULL), .sub = conf_redis_keys},
    {KEY("shared", CT_BOOL, C(cache.shared), 0, 0, "false")},
    {KEY("paths", CT_STRLIST, C(cache.paths), 0, 100,
         "/chat/completions /v1/chat/completions /completions /v1/completions"
         " /embeddings /v1/embeddings /anthropic/v1/messages /v1/messages"),
     .noff = C(cache.npaths), .check = conf_check_path},
    {.name = NULL},
};

static const struct conf_key conf_compat_memory_keys[] = {
    {KEY("max_entries", CT_I64, C(compat.max_entries), 1, 10000000, "4096")},
    {KEY("max_bytes", CT_SIZE, C(compat.max_bytes), KB, 64 * GB, "32MB")},
    {.name = NULL},
};

static const struct conf_key conf_compat_keys[] = {
    {KEY("reasoning_content", CT_ENUM, C(compat.reasoning_content), 0, 0, "off"),
     .names = conf_compat_reasoning_names},
    {KEY("memory", CT_MAP, 0, 0, 0, NULL), .sub = conf_compat_memory_keys},
    {KEY("max_reasoning", CT_SIZE, C(compat.max_reasoning), KB, GB, "1MB")},
    {.name = NULL},
};

static const struct conf_key conf_fleet_keys[] = {
    {KEY("redis", CT_STR, C(fleet.redis), 0, 0, ""), .flags = CK_NORELOAD | CK_SECRET,
     .check = conf_check_redis},
    {KEY("lease_ttl", CT_DUR, C(fleet.lease_ttl_ms), MS_S, MS_H, "30s")},
    {KEY("fallback_instances", CT_INT, C(fleet.fallback_instances), 1, 1000, "4")},
    {.name = NULL},
};

static const struct conf_key conf_client_keys[] = {
    {KEY("name", CT_STR, CL(name), 0, 0, ""), .check = conf_check_client_name},
    {KEY("token_env", CT_STR, CL(token_env), 0, 0, ""), .check = conf_check_env},
    {KEY("priority", CT_ENUM, CL(priority), 0, 0, "medium"), .names = conf_prio_names},
    {KEY("weight", CT_INT, CL(weight), 1, 1000, "1")},
    {KEY("max_inflight", CT_INT, CL(max_inflight), 0, 100000, "0")},
    {KEY("rpm", CT_I64, CL(rpm), 0, 100000000, "0")},
    {KEY("tpm", CT_I64, CL(tpm), 0, 100000000000LL, "0")},
    {KEY("tokens_per_day", CT_I64, CL(tokens_per_day), 0, 1000000000000LL, "0")},
    {KEY("over_limit", CT_ENUM, CL(over_limit), 0, 0, "queue"), .names = conf_over_limit_names},
    {KEY("max_tokens_default", CT_I64, CL(max_tokens_default), 1, 10000000, "1024")},
    {.name = NULL},
};

static const struct conf_key conf_limit_keys[] = {
    {KEY("max_body", CT_SIZE, C(limits.max_body), KB, GB, "8MB")},
    {KEY("max_headers", CT_SIZE, C(limits.max_headers), KB, MB, "64KB")},
    {KEY("max_connections", CT_I64, C(limits.max_connections), 1, 1000000, "10000")},
    {KEY("header_timeout", CT_DUR, C(limits.header_timeout_ms), MS_S, MS_H, "10s")},
    {KEY("body_timeout", CT_DUR, C(limits.body_timeout_ms), MS_S, MS_H, "60s")},
    {KEY("idle_timeout", CT_DUR, C(limits.idle_timeout_ms), MS_S, MS_H, "60s")},
    {.name = NULL},
};

static const struct conf_key conf_log_keys[] = {
    {KEY("level", CT_ENUM, C(log.level), 0, 0, "info"), .names = conf_level_names},
    {KEY("format", CT_ENUM, C(log.format), 0, 0, "json"), .names = conf_format_names},
    {KEY("file", CT_STR, C(log.file), 0, 0, "")},
    {.name = NULL},
};

static const struct conf_key conf_keys[] = {
    {KEY("listen", CT_STR, C(listen), 0, 0, "127.0.0.1:8080"), .flags = CK_NORELOAD,
     .check = conf_check_listen},
    {KEY("admin_listen", CT_STR, C(admin_listen), 0, 0, ""), .flags = CK_NORELOAD,
     .check = conf_check_admin},
    {KEY("upstreams", CT_LIST, C(upstreams), 1, ROUTE_MAX_UPSTREAMS, NULL), .flags = CK_ONE_ITEM,
     .noff = C(nupstreams), .size = sizeof(struct conf_upstream), .sub = conf_upstream_keys,
     .item = conf_check_upstream},
    {KEY("routing", CT_ENUM, C(routing), 0, 0, "failover"), .names = conf_routing_names},
    {KEY("queue", CT_MAP, 0, 0, 0, NULL), .sub = conf_queue_keys},
    {KEY("retry", CT_MAP, 0, 0, 0, NULL), .sub = conf_retry_keys},
    {KEY("cache", CT_MAP, 0, 0, 0, NULL), .sub = conf_cache_keys},
    {KEY("compat", CT_MAP, 0, 0, 0, NULL), .sub = conf_compat_keys},
    {KEY("fleet", CT_MAP, 0, 0, 0, NULL), .sub = conf_fleet_keys},
    {KEY("clients", CT_LIST, C(clients), 0, 10000, NULL), .noff = C(nclients),
     .size = sizeof(struct conf_client), .sub = conf_client_keys, .item = conf_check_client},
    {KEY("limits", CT_MAP, 0, 0, 0, NULL), .sub = conf_limit_keys},
    {KEY("keepalive", CT_MAP, 0, 0, 0, NULL), .sub = conf_keepalive_keys},
    {KEY("shutdown_timeout", CT_DUR, C(shutdown_timeout_ms), 0, MS_H, "30s")},
    {KEY("log", CT_MAP, 0, 0, 0, NULL), .sub = conf_log_keys},
    {.name = NULL},
};

/* ---- small helpers ---- */

#define FIELD(base, off, type) ((type *)(void *)((char *)(base) + (off)))

static void *
conf_alloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);

    if (p == NULL) {
        fputs("dsgate: out of memory reading the configuration\n", stderr);
        abort();
    }
    return p;
}

static char *
conf_strdup(const char *s)
{
    size_t n = strlen(s) + 1;

    return memcpy(conf_alloc(n), s, n);
}

/* Append one formatted line to a newline-separated malloc'd list. */
static void
conf_append(char **buf, size_t *len, const char *fmt, ...)
{
    va_list ap;
    int n;
    char *p;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    p = realloc(*buf, *len + (size_t)n + 2);
    if (p == NULL) {
        fputs("dsgate: out of memory reading the configuration\n", stderr);
        abort();
    }
    *buf = p;
    if (*len > 0) {
        p[(*len)++] = '\n';
    }
    va_start(ap, fmt);
    vsnprintf(p + *len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    *len += (size_t)n;
}

static void
conf_err(struct conf_ctx *x, yaml_mark_t m, const char *path, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    if (++x->nerr > CONF_MAX_ERRORS) {
        if (x->nerr == CONF_MAX_ERRORS + 1) {
            conf_append(&x->err, &x->len, "%s: further errors not shown", x->name);
        }
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    conf_append(&x->err, &x->len, "%s:%zu:%zu: %s: %s", x->name, (size_t)m.line + 1,
                (size_t)m.column + 1, path, msg);
}

/* A key path for messages, cut to N bytes; unprintable bytes become '?'. */
static void
conf_pathf(char *buf, size_t n, const char *fmt, ...)
{
    va_list ap;
    char *p;

    va_start(ap, fmt);
    vsnprintf(buf, n, fmt, ap);
    va_end(ap);
    for (p = buf; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f) {
            *p = '?';
        }
    }
}

/* PARENT.NAME, or NAME at the top. */
static void
conf_path(char *buf, size_t n, const char *parent, const char *name)
{
    conf_pathf(buf, n, "%s%s%s", parent, *parent ? "." : "", name);
}

static yaml_node_t *
conf_node(struct conf_ctx *x, int i)
{
    return yaml_document_get_node(x->doc, i);
}

static const char *
conf_scalar(const yaml_node_t *n)
{
    return (const char *)n->data.scalar.value;
}

/* A plain "", "~" or "null": an empty section or string. */
static bool
conf_is_null(const yaml_node_t *n)
{
    const char *v;

    if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) {
        return false;
    }
    v = conf_scalar(n);
    return *v == '\0' || strcmp(v, "~") == 0 || strcmp(v, "null") == 0 || strcmp(v, "Null") == 0 ||
           strcmp(v, "NULL") == 0;
}

/* ' (got "v")' for a message: escaped, shortened, user:password@ masked. */
static const char *
conf_got(const yaml_node_t *n, bool secret, char *buf, size_t size)
{
    const char *s, *at, *auth, *slash;
    size_t o = 0, i, len;

    if (n->type == YAML_SEQUENCE_NODE) {
        return " (got a list)";
    }
    if (n->type == YAML_MAPPING_NODE) {
        return " (got a map)";
    }
    s = conf_scalar(n);
    len = n->data.scalar.length;
    o += (size_t)snprintf(buf, size, " (got \"");
    auth = secret ? strstr(s, "://") : NULL;
    for (i = 0; i < len && o + 12 < size; i++) {
        unsigned char c = (unsigned char)s[i];

        if (auth != NULL && s + i == auth + 3) {
            slash = strchr(auth + 3, '/');
            at = strrchr(auth + 3, '@');
            if (at != NULL && (slash == NULL || at < slash)) {
                o += (size_t)snprintf(buf + o, size - o, "***");
                i = (size_t)(at - s);
                c = '@';
            }
        }
        if (i >= 60) {
            o += (size_t)snprintf(buf + o, size - o, "...");
            break;
        }
        if (c < 0x20 || c == 0x7f || c == '"' || c == '\\') {
            o += (size_t)snprintf(buf + o, size - o, "\\x%02x", c);
        } else {
            buf[o++] = (char)c;
        }
    }
    snprintf(buf + o, size - o, "\")");
    return buf;
}

/* Leading decimal digits of *SP, advancing it; -1 if none or overflow. */
static int
conf_digits(const char **sp, int64_t *v)
{
    const char *s = *sp;

    *v = 0;
    if (*s < '0' || *s > '9') {
        return -1;
    }
    for (; *s >= '0' && *s <= '9'; s++) {
        if (*v > (INT64_MAX - (*s - '0')) / 10) {
            return -1;
        }
        *v = *v * 10 + (*s - '0');
    }
    *sp = s;
    return 0;
}

static int
conf_scale(int64_t v, int64_t unit, int64_t *out)
{
    if (v > INT64_MAX / unit) {
        return -1;
    }
    *out = v * unit;
    return 0;
}

int
conf_parse_duration(const char *s, int64_t *ms)
{
    static const struct {
        const char *unit;
        int64_t ms;
    } units[] = {
        {"ms", 1},
        {"s", MS_S},
        {"m", MS_M},
        {"h", MS_H},
    };
    int64_t v;
    size_t i;

    if (s == NULL || conf_digits(&s, &v) < 0) {
        return -1;
    }
    if (*s == '\0') {
        if (v != 0) {
            return -1; /* only 0 goes without a unit */
        }
        *ms = 0;
        return 0;
    }
    for (i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (strcmp(s, units[i].unit) == 0) {
            return conf_scale(v, units[i].ms, ms);
        }
    }
    return -1;
}

int
conf_parse_size(const char *s, int64_t *bytes)
{
    static const struct {
        const char *unit;
        int64_t n;
    } units[] = {
        {"", 1},
        {"KB", KB},
        {"MB", MB},
        {"GB", GB},
    };
    int64_t v;
    size_t i;

    if (s == NULL || conf_digits(&s, &v) < 0) {
        return -1;
    }
    for (i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (strcasecmp(s, units[i].unit) == 0) {
            return conf_scale(v, units[i].n, bytes);
        }
    }
    return -1;
}

/* Optional '-' then digits: negatives parse so that bounds can name them. */
static int
conf_parse_int(const char *s, int64_t *v)
{
    bool neg = *s == '-';

    if (neg) {
        s++;
    }
    if (conf_digits(&s, v) < 0 || *s != '\0') {
        return -1;
    }
    if (neg) {
        *v = -*v;
    }
    return 0;
}

/* Digits with at most one '.', e.g. "0.5", "2", "10.0"; no exponent. */
static int
conf_parse_double(const char *s, double *d)
{
    size_t digits = strspn(s, "0123456789");
    const char *p = s + digits;

    if (*p == '.') {
        size_t frac = strspn(p + 1, "0123456789");

        digits += frac;
        p += 1 + frac;
    }
    if (digits == 0 || *p != '\0') {
        return -1;
    }
    *d = strtod(s, NULL);
    return 0;
}

int
conf_parse_priority(const char *s, enum prio *p)
{
    int i;

    for (i = 0; s != NULL && conf_prio_names[i] != NULL; i++) {
        if (strcasecmp(s, conf_prio_names[i]) == 0) {
            *p = (enum prio)i;
            return 0;
        }
    }
    return -1;
}

const char *
conf_priority_name(enum prio p)
{
    return (unsigned)p < PRIO_COUNT ? conf_prio_names[p] : "unknown";
}

static void
conf_fmt_dur(int64_t ms, char *buf, size_t n)
{
    if (ms == 0) {
        snprintf(buf, n, "0");
    } else if (ms % MS_H == 0) {
        snprintf(buf, n, "%lldh", (long long)(ms / MS_H));
    } else if (ms % MS_M == 0) {
        snprintf(buf, n, "%lldm", (long long)(ms / MS_M));
    } else if (ms % MS_S == 0) {
        snprintf(buf, n, "%llds", (long long)(ms / MS_S));
    } else {
        snprintf(buf, n, "%lldms", (long long)ms);
    }
}

static void
conf_fmt_size(int64_t b, char *buf, size_t n)
{
    if (b != 0 && b % GB == 0) {
        snprintf(buf, n, "%lldGB", (long long)(b / GB));
    } else if (b != 0 && b % MB == 0) {
        snprintf(buf, n, "%lldMB", (long long)(b / MB));
    } else if (b != 0 && b % KB == 0) {
        snprintf(buf, n, "%lldKB", (long long)(b / KB));
    } else {
        snprintf(buf, n, "%lld", (long long)b);
    }
}

/* ---- string checks: 0, or -1 with WHY (never quoting the value) ---- */

/*
 * "host:port" or "[v6]:port", port 0..65535 (0: any free port).  HOST gets
 * the host without brackets.
 */
int
conf_parse_hostport(const char *s, char *host, size_t hostlen, int *port)
{
    const char *h = s, *p, *end;
    size_t hl;
    int64_t v;

    if (s[0] == '[') {
        end = strchr(s, ']');
        if (end == NULL || end[1] != ':') {
            return -1;
        }
        h = s + 1;
        hl = (size_t)(end - h);
        if (strspn(h, "0123456789abcdefABCDEF:.") < hl) {
            return -1;
        }
        p = end + 2;
    } else {
        end = strrchr(s, ':');
        if (end == NULL) {
            return -1;
        }
        hl = (size_t)(end - s);
        if (strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                      "0123456789.-_") < hl) {
            return -1;
        }
        p = end + 1;
    }
    if (hl == 0 || hl >= hostlen || strlen(p) > 5 || conf_digits(&p, &v) < 0 || *p != '\0' ||
        v > 65535) {
        return -1;
    }
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port = (int)v;
    return 0;
}

static int
conf_check_listen(const char *s, char *why, size_t n)
{
    char host[256];
    int port;

    if (conf_parse_hostport(s, host, sizeof(host), &port) < 0) {
        snprintf(why, n, "must be host:port with a port from 0 to 65535");
        return -1;
    }
    return 0;
}

static int
conf_check_admin(const char *s, char *why, size_t n)
{
    return *s == '\0' ? 0 : conf_check_listen(s, why, n);
}

/* Host of an http(s) base URL into HOST; -1 with WHY when it is not one. */
static int
conf_url_host(const char *url, char *host, size_t hostlen, char *why, size_t n)
{
    const char *p, *end, *h, *hend, *port;
    int64_t v;

    if (strncasecmp(url, "http://", 7) == 0) {
        p = url + 7;
    } else if (strncasecmp(url, "https://", 8) == 0) {
        p = url + 8;
    } else {
        snprintf(why, n, "must start with http:// or https://");
        return -1;
    }
    for (h = url; *h; h++) {
        if ((unsigned char)*h <= 0x20 || *h == 0x7f) {
            snprintf(why, n, "must not contain spaces or control characters");
            return -1;
        }
    }
    if (strpbrk(p, "?#") != NULL) {
        snprintf(why, n, "must not have a query or fragment");
        return -1;
    }
    end = p + strcspn(p, "/");
    if (memchr(p, '@', (size_t)(end - p)) != NULL) {
        snprintf(why, n, "must not contain user:password@ (use api_key_env)");
        return -1;
    }
    if (*p == '[') {
        h = p + 1;
        hend = memchr(p, ']', (size_t)(end - p));
        if (hend == NULL || strspn(h, "0123456789abcdefABCDEF:.") < (size_t)(hend - h)) {
            snprintf(why, n, "has a malformed [IPv6] host");
            return -1;
        }
        port = hend + 1;
    } else {
        h = p;
        hend = memchr(p, ':', (size_t)(end - p));
        hend = hend != NULL ? hend : end;
        if (strspn(h, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                      "0123456789.-_") < (size_t)(hend - h)) {
            snprintf(why, n, "has a malformed host");
            return -1;
        }
        port = hend;
    }
    if (hend == h || (size_t)(hend - h) >= hostlen) {
        snprintf(why, n, "must name a host");
        return -1;
    }
    if (port != end) {
        p = port + 1;
        if (*port != ':' || end - p > 5 || conf_digits(&p, &v) < 0 || p != end || v < 1 ||
            v > 65535) {
            snprintf(why, n, "must have a port from 1 to 65535");
            return -1;
        }
    }
    memcpy(host, h, (size_t)(hend - h));
    host[hend - h] = '\0';
    return 0;
}

static int
conf_check_url(const char *s, char *why, size_t n)
{
    char host[256];

    return conf_url_host(s, host, sizeof(host), why, n);
}

static bool
conf_is_loopback(const char *host)
{
    struct in_addr a4;
    struct in6_addr a6;

    if (strcasecmp(host, "localhost") == 0) {
        return true;
    }
    if (inet_pton(AF_INET, host, &a4) == 1) {
        return (ntohl(a4.s_addr) >> 24) == 127;
    }
    return inet_pton(AF_INET6, host, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6);
}

/* "" (off), redis://[user:pass@]host[:port][/db], rediss://..., unix:///path. */
static int
conf_check_redis(const char *s, char *why, size_t n)
{
    static const char *const schemes[] = {"redis://", "rediss://", "unix://"};
    const char *p;
    size_t i;

    if (*s == '\0') {
        return 0;
    }
    for (p = s; *p; p++) {
        if ((unsigned char)*p <= 0x20 || *p == 0x7f) {
            snprintf(why, n, "must not contain spaces or control characters");
            return -1;
        }
    }
    for (i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++) {
        size_t len = strlen(schemes[i]);

        if (strncasecmp(s, schemes[i], len) == 0 && s[len] != '\0') {
            return 0;
        }
    }
    snprintf(why, n, "must be empty or a redis://, rediss:// or unix:// URL");
    return -1;
}

/* "" or an environment variable name: [A-Za-z_][A-Za-z0-9_]*. */
static int
conf_check_env(const char *s, char *why, size_t n)
{
    static const char first[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_";

    if (*s == '\0') {
        return 0;
    }
    if (strchr(first, *s) == NULL ||
        s[strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                    "0123456789_")] != '\0' ||
        strlen(s) > 128) {
        snprintf(why, n,
                 "must be the name of an environment variable "
                 "(letters, digits, _)");
        return -1;
    }
    return 0;
}

/* Upstream names appear in headers, logs and metric labels. */
static int
conf_check_name(const char *s, char *why, size_t n)
{
    size_t len = strlen(s);

    if (len > 64 || s[strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                "0123456789._-")] != '\0') {
        snprintf(why, n, "must be 1 to 64 letters, digits, '.', '_' or '-'");
        return -1;
    }
    return 0;
}

/* Client names are metric label values: lower case. */
static int
conf_check_client_name(const char *s, char *why, size_t n)
{
    size_t len = strlen(s);

    if (len > 64 || s[strspn(s, "abcdefghijklmnopqrstuvwxyz0123456789._-")] != '\0') {
        snprintf(why, n, "must be 1 to 64 lower-case letters, digits, '.', '_' or '-'");
        return -1;
    }
    return 0;
}

static int
conf_check_path(const char *s, char *why, size_t n)
{
    const char *p;

    for (p = s; *p; p++) {
        if ((unsigned char)*p <= 0x20 || *p == 0x7f || *p == '?' || *p == '#') {
            break;
        }
    }
    if (s[0] != '/' || *p != '\0') {
        snprintf(why, n,
                 "must be a path starting with '/' "
                 "(no spaces, query or fragment)");
        return -1;
    }
    return 0;
}

/* ---- storing one scalar (shared by defaults and the YAML walk) ---- */

static int
conf_store_enum(const struct conf_key *k, int *dst, const char *s, char *why, size_t n)
{
    size_t o;
    int i;

    for (i = 0; k->names[i] != NULL; i++) {
        if (strcasecmp(s, k->names[i]) == 0) {
            *dst = i;
            return 0;
        }
    }
    o = (size_t)snprintf(why, n, "must be one of ");
    for (i = 0; k->names[i] != NULL && o < n; i++) {
        o += (size_t)snprintf(why + o, n - o, "%s%s", i > 0 ? ", " : "", k->names[i]);
    }
    return -1;
}

/* Convert S for key K and store it into BASE; -1 with WHY if invalid. */
static int
conf_store(const struct conf_key *k, void *base, const char *s, char *why, size_t n)
{
    void *dst = FIELD(base, k->off, char);
    char lo[32], hi[32];
    int64_t v = 0;
    double d;

    switch (k->type) {
    case CT_STR:
        if ((k->flags & CK_NONEMPTY) && *s == '\0') {
            snprintf(why, n, "must not be empty");
            return -1;
        }
        if (k->check != NULL && k->check(s, why, n) < 0) {
            return -1;
        }
        free(*(char **)dst);
        *(char **)dst = conf_strdup(s);
        return 0;
    case CT_BOOL:
        if (strcasecmp(s, "true") != 0 && strcasecmp(s, "false") != 0) {
            snprintf(why, n, "must be true or false");
            return -1;
        }
        *(bool *)dst = strcasecmp(s, "true") == 0;
        return 0;
    case CT_ENUM:
        return conf_store_enum(k, dst, s, why, n);
    case CT_DOUBLE:
        if (conf_parse_double(s, &d) < 0) {
            snprintf(why, n, "must be a number such as 0.5");
            return -1;
        }
        if (d < (double)k->min || d > (double)k->max) {
            snprintf(why, n, "must be between %lld and %lld", (long long)k->min, (long long)k->max);
            return -1;
        }
        *(double *)dst = d;
        return 0;
    case CT_INT:
    case CT_I64:
        if (conf_parse_int(s, &v) < 0) {
            snprintf(why, n, "must be a whole number");
            return -1;
        }
        snprintf(lo, sizeof(lo), "%lld", (long long)k->min);
        snprintf(hi, sizeof(hi), "%lld", (long long)k->max);
        break;
    case CT_DUR:
        if (conf_parse_duration(s, &v) < 0) {
            snprintf(why, n, "must be a duration such as 250ms, 5s, 2m or 24h");
            return -1;
        }
        conf_fmt_dur(k->min, lo, sizeof(lo));
        conf_fmt_dur(k->max, hi, sizeof(hi));
        break;
    case CT_SIZE:
        if (conf_parse_size(s, &v) < 0) {
            snprintf(why, n, "must be a size such as 512, 64KB, 8MB or 1GB");
            return -1;
        }
        conf_fmt_size(k->min, lo, sizeof(lo));
        conf_fmt_size(k->max, hi, sizeof(hi));
        break;
    default:
        snprintf(why, n, "internal error: not a scalar key");
        return -1;
    }
    if (v < k->min || v > k->max) {
        snprintf(why, n, "must be between %s and %s", lo, hi);
        return -1;
    }
    if (k->type == CT_INT) {
        *(int *)dst = (int)v;
    } else {
        *(int64_t *)dst = v;
    }
    return 0;
}

/* One retry.on word: an HTTP status, "connect" or "timeout". */
static int
conf_store_retry_on(struct conf *c, const char *s, char *why, size_t n)
{
    bool *flag = NULL;
    int64_t v;
    size_t i;

    if (strcasecmp(s, "connect") == 0) {
        flag = &c->retry.on_connect;
    } else if (strcasecmp(s, "timeout") == 0) {
        flag = &c->retry.on_timeout;
    }
    if (flag != NULL) {
        if (*flag) {
            snprintf(why, n, "is listed twice");
            return -1;
        }
        *flag = true;
        return 0;
    }
    if (conf_parse_int(s, &v) < 0 || v < 100 || v > 599) {
        snprintf(why, n, "must be an HTTP status from 100 to 599, connect or timeout");
        return -1;
    }
    for (i = 0; i < c->retry.non_status; i++) {
        if (c->retry.on_status[i] == v) {
            snprintf(why, n, "is listed twice");
            return -1;
        }
    }
    if (c->retry.non_status == CONF_MAX_RETRY_STATUS) {
        snprintf(why, n, "at most %d status codes may be listed", CONF_MAX_RETRY_STATUS);
        return -1;
    }
    c->retry.on_status[c->retry.non_status++] = (int)v;
    return 0;
}

/* One upstreams[].dialects word: the name of a dialect. */
static int
conf_store_dialect(unsigned *bits, const char *s, char *why, size_t n)
{
    int id = dialect_by_name(s);

    if (id < 0) {
        size_t o = (size_t)snprintf(why, n, "must be one of ");
        for (int i = 0; i < DIALECTS && o < n; i++) {
            o += (size_t)snprintf(why + o, n - o, "%s%s", i > 0 ? ", " : "",
                                  dialect_by_id((enum dialect_id)i)->name);
        }
        return -1;
    }
    if (*bits & DIALECT_BIT(id)) {
        snprintf(why, n, "is listed twice");
        return -1;
    }
    *bits |= DIALECT_BIT(id);
    return 0;
}

static int
conf_store_item(const struct conf_key *k, void *base, const char *s, char *why, size_t n)
{
    char ***arr = FIELD(base, k->off, char **);
    size_t *cnt = FIELD(base, k->noff, size_t);

    if (k->type == CT_RETRY_ON) {
        return conf_store_retry_on(base, s, why, n);
    }
    if (k->type == CT_DIALECTS) {
        return conf_store_dialect(FIELD(base, k->off, unsigned), s, why, n);
    }
    if (k->check != NULL && k->check(s, why, n) < 0) {
        return -1;
    }
    (*arr)[(*cnt)++] = conf_strdup(s);
    return 0;
}

/* ---- freeing and defaults, both driven by the table ---- */

static void conf_free_keys(const struct conf_key *tab, void *base);

static void
conf_clear(const struct conf_key *k, void *base)
{
    size_t *cnt = FIELD(base, k->noff, size_t);
    size_t i;

    if (k->type == CT_RETRY_ON) {
        struct conf *c = base;

        c->retry.non_status = 0;
        c->retry.on_connect = false;
        c->retry.on_timeout = false;
    } else if (k->type == CT_DIALECTS) {
        *FIELD(base, k->off, unsigned) = 0;
        return; /* no array, no count */
    } else if (k->type == CT_LIST) {
        char *items = *FIELD(base, k->off, char *);

        for (i = 0; i < *cnt; i++) {
            conf_free_keys(k->sub, items + i * k->size);
        }
        free(items);
    } else if (k->type == CT_STRLIST) {
        char **s = *FIELD(base, k->off, char **);

        for (i = 0; i < *cnt; i++) {
            free(s[i]);
        }
        free(s);
    } else if (k->type == CT_MODELS) {
        struct conf_model *m = *FIELD(base, k->off, struct conf_model *);

        for (i = 0; i < *cnt; i++) {
            free(m[i].from);
            free(m[i].to);
        }
        free(m);
    }
    if (k->type != CT_RETRY_ON) {
        *FIELD(base, k->off, void *) = NULL;
        *cnt = 0;
    }
}

static void
conf_free_keys(const struct conf_key *tab, void *base)
{
    const struct conf_key *k;

    for (k = tab; k->name != NULL; k++) {
        if (k->type == CT_STR) {
            free(*FIELD(base, k->off, char *));
            *FIELD(base, k->off, char *) = NULL;
        } else if (k->type == CT_MAP) {
            conf_free_keys(k->sub, base);
        } else if (k->type >= CT_LIST) {
            conf_clear(k, base);
        }
    }
}

/*
 * Store the table's defaults into BASE.  ALL false (an item from a file):
 * required strings start as "" so that later checks can tell them unset.
 */
static void
conf_defaults_keys(const struct conf_key *tab, void *base, bool all)
{
    const struct conf_key *k;
    char why[160], words[256], *w, *save;

    for (k = tab; k->name != NULL; k++) {
        switch (k->type) {
        case CT_MAP:
            conf_defaults_keys(k->sub, base, all);
            break;
        case CT_LIST:
            conf_clear(k, base);
            if (k->flags & CK_ONE_ITEM) {
                *FIELD(base, k->off, void *) = conf_alloc(k->size);
                conf_defaults_keys(k->sub, *FIELD(base, k->off, void *), true);
                *FIELD(base, k->noff, size_t) = 1;
            }
            break;
        case CT_STRLIST:
        case CT_RETRY_ON:
        case CT_MODELS:
        case CT_DIALECTS:
            conf_clear(k, base);
            if (k->type == CT_STRLIST) {
                *FIELD(base, k->off, char **) = conf_alloc((size_t)k->max * sizeof(char *));
            }
            snprintf(words, sizeof(words), "%s", k->def);
            for (w = strtok_r(words, " ", &save); w != NULL; w = strtok_r(NULL, " ", &save)) {
                if (conf_store_item(k, base, w, why, sizeof(why)) < 0) {
                    abort(); /* the table above is wrong */
                }
            }
            break;
        default:
            if (!all && (k->flags & CK_REQUIRED)) {
                free(*FIELD(base, k->off, char *));
                *FIELD(base, k->off, char *) = conf_strdup("");
            } else if (conf_store(k, base, k->def, why, sizeof(why)) < 0) {
                abort(); /* the table above is wrong */
            }
            break;
        }
    }
}

int64_t
conf_max_wait_ms(const struct conf *c, enum prio p)
{
    int64_t ms = (unsigned)p < PRIO_COUNT ? c->queue.class_max_wait_ms[p] : 0;

    return ms > 0 ? ms : c->queue.max_wait_ms;
}

struct conf *
conf_defaults(void)
{
    struct conf *c = conf_alloc(sizeof(*c));

    conf_defaults_keys(conf_keys, c, true);
    conf_upstream_dialects(&c->upstreams[0]);
    return c;
}

void
conf_free(struct conf *c)
{
    if (c == NULL) {
        return;
    }
    conf_free_keys(conf_keys, c);
    free(c->file);
    free(c);
}

/* ---- the walk over the YAML tree ---- */

/* Value of NAME in mapping MAP (NULL if absent or MAP is not a map). */
static yaml_node_t *
conf_lookup(struct conf_ctx *x, yaml_node_t *map, const char *name, yaml_node_t **key)
{
    yaml_node_pair_t *p;

    if (map == NULL || map->type != YAML_MAPPING_NODE) {
        return NULL;
    }
    for (p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
        yaml_node_t *kn = conf_node(x, p->key);

        if (kn->type == YAML_SCALAR_NODE && strcmp(conf_scalar(kn), name) == 0) {
            if (key != NULL) {
                *key = kn;
            }
            return conf_node(x, p->value);
        }
    }
    return NULL;
}

/* Whether the key of pair P already appeared earlier in MAP. */
static bool
conf_dup(struct conf_ctx *x, yaml_node_t *map, yaml_node_pair_t *p)
{
    yaml_node_t *kn = conf_node(x, p->key);
    yaml_node_pair_t *q;

    for (q = map->data.mapping.pairs.start; q < p; q++) {
        yaml_node_t *qn = conf_node(x, q->key);

        if (qn->type == YAML_SCALAR_NODE && strcmp(conf_scalar(qn), conf_scalar(kn)) == 0) {
            return true;
        }
    }
    return false;
}

/* A scalar without NUL bytes, or NULL after reporting why not. */
static const char *
conf_text(struct conf_ctx *x, yaml_node_t *v, yaml_mark_t m, const char *path, const char *what)
{
    char got[128];

    if (v->type != YAML_SCALAR_NODE) {
        conf_err(x, m, path, "must be %s%s", what, conf_got(v, false, got, sizeof(got)));
        return NULL;
    }
    if (strlen(conf_scalar(v)) != v->data.scalar.length) {
        conf_err(x, m, path, "must not contain NUL bytes");
        return NULL;
    }
    return conf_scalar(v);
}

static void conf_value(struct conf_ctx *x, const struct conf_key *k, void *base, yaml_node_t *v,
                       yaml_mark_t m, const char *path);

static void
conf_map(struct conf_ctx *x, const struct conf_key *tab, void *base, yaml_node_t *map,
         yaml_mark_t m, const char *path)
{
    yaml_node_pair_t *p;
    char got[128], sub[CONF_PATH];

    if (conf_is_null(map)) {
        return; /* "queue:" alone keeps the defaults */
    }
    if (map->type != YAML_MAPPING_NODE) {
        conf_err(x, m, path, "must be a map%s", conf_got(map, false, got, sizeof(got)));
        return;
    }
    for (p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
        yaml_node_t *kn = conf_node(x, p->key);
        const struct conf_key *k;

        if (kn->type != YAML_SCALAR_NODE) {
            conf_err(x, kn->start_mark, *path ? path : "(top level)", "keys must be plain words%s",
                     conf_got(kn, false, got, sizeof(got)));
            continue;
        }
        conf_path(sub, sizeof(sub), path, conf_scalar(kn));
        if (conf_dup(x, map, p)) {
            conf_err(x, kn->start_mark, sub, "duplicate key");
            continue;
        }
        for (k = tab; k->name != NULL && strcmp(k->name, conf_scalar(kn)) != 0; k++) {
        }
        if (k->name == NULL) {
            conf_err(x, kn->start_mark, sub, "unknown key");
            continue;
        }
        conf_value(x, k, base, conf_node(x, p->value), kn->start_mark, sub);
    }
}

/* A list of maps (upstreams, clients): each item starts from the defaults. */
static void
conf_list(struct conf_ctx *x, const struct conf_key *k, void *base, yaml_node_t *v, yaml_mark_t m,
          const char *path)
{
    size_t *cnt = FIELD(base, k->noff, size_t);
    size_t i, n = 0;
    char got[128], ipath[CONF_PATH], rpath[CONF_PATH];

    if (!conf_is_null(v) && v->type != YAML_SEQUENCE_NODE) {
        conf_err(x, m, path, "must be a list%s", conf_got(v, false, got, sizeof(got)));
        return;
    }
    conf_clear(k, base);
    if (v->type == YAML_SEQUENCE_NODE) {
        n = (size_t)(v->data.sequence.items.top - v->data.sequence.items.start);
    }
    if ((int64_t)n < k->min || (int64_t)n > k->max) {
        conf_err(x, m, path, "must have %lld to %lld entries (got %zu)", (long long)k->min,
                 (long long)k->max, n);
        return;
    }
    *FIELD(base, k->off, void *) = conf_alloc(n * k->size);
    for (i = 0; i < n; i++) {
        yaml_node_t *item = conf_node(x, v->data.sequence.items.start[i]);
        char *slot = *FIELD(base, k->off, char *) + *cnt * k->size;
        const struct conf_key *r;

        conf_pathf(ipath, sizeof(ipath), "%s[%zu]", path, i);
        if (item->type != YAML_MAPPING_NODE) {
            conf_err(x, item->start_mark, ipath, "must be a map%s",
                     conf_got(item, false, got, sizeof(got)));
            continue;
        }
        conf_defaults_keys(k->sub, slot, false);
        (*cnt)++;
        conf_map(x, k->sub, slot, item, item->start_mark, ipath);
        for (r = k->sub; r->name != NULL; r++) {
            if ((r->flags & CK_REQUIRED) && conf_lookup(x, item, r->name, NULL) == NULL) {
                conf_path(rpath, sizeof(rpath), ipath, r->name);
                conf_err(x, item->start_mark, rpath, "is required");
            }
        }
        if (k->item != NULL) {
            k->item(x, *FIELD(base, k->off, char *), *cnt - 1, item, ipath);
        }
    }
}

/* A list of words (cache.paths, retry.on, upstreams[].dialects). */
static void
conf_words(struct conf_ctx *x, const struct conf_key *k, void *base, yaml_node_t *v, yaml_mark_t m,
           const char *path)
{
    size_t i, n = 0;
    char got[128], why[160], ipath[CONF_PATH];

    if (!conf_is_null(v) && v->type != YAML_SEQUENCE_NODE) {
        conf_err(x, m, path, "must be a list%s", conf_got(v, false, got, sizeof(got)));
        return;
    }
    conf_clear(k, base);
    if (v->type == YAML_SEQUENCE_NODE) {
        n = (size_t)(v->data.sequence.items.top - v->data.sequence.items.start);
    }
    if ((int64_t)n > k->max || (int64_t)n < k->min) {
        if (k->min > 0) {
            conf_err(x, m, path, "must have %lld to %lld entries (got %zu)", (long long)k->min,
                     (long long)k->max, n);
        } else {
            conf_err(x, m, path, "must have at most %lld entries (got %zu)", (long long)k->max,
                     n);
        }
        return;
    }
    if (k->type == CT_STRLIST) {
        *FIELD(base, k->off, char **) = conf_alloc(n * sizeof(char *));
    }
    for (i = 0; i < n; i++) {
        yaml_node_t *item = conf_node(x, v->data.sequence.items.start[i]);
        const char *s;

        conf_pathf(ipath, sizeof(ipath), "%s[%zu]", path, i);
        s = conf_text(x, item, item->start_mark, ipath, "a single value");
        if (s != NULL && conf_store_item(k, base, s, why, sizeof(why)) < 0) {
            conf_err(x, item->start_mark, ipath, "%s%s", why,
                     conf_got(item, false, got, sizeof(got)));
        }
    }
}

/* upstreams[].models: client model name -> upstream model name. */
static void
conf_models(struct conf_ctx *x, const struct conf_key *k, void *base, yaml_node_t *v, yaml_mark_t m,
            const char *path)
{
    size_t *cnt = FIELD(base, k->noff, size_t);
    struct conf_model *models;
    yaml_node_pair_t *p;
    char got[128], sub[CONF_PATH];
    size_t n = 0;

    if (!conf_is_null(v) && v->type != YAML_MAPPING_NODE) {
        conf_err(x, m, path, "must be a map of model names%s",
                 conf_got(v, false, got, sizeof(got)));
        return;
    }
    conf_clear(k, base);
    if (v->type == YAML_MAPPING_NODE) {
        n = (size_t)(v->data.mapping.pairs.top - v->data.mapping.pairs.start);
    }
    if ((int64_t)n > k->max) {
        conf_err(x, m, path, "must have at most %lld entries (got %zu)", (long long)k->max, n);
        return;
    }
    models = conf_alloc(n * sizeof(*models));
    *FIELD(base, k->off, struct conf_model *) = models;
    for (p = v->data.mapping.pairs.start; n > 0 && p < v->data.mapping.pairs.top; p++) {
        yaml_node_t *kn = conf_node(x, p->key), *vn = conf_node(x, p->value);
        const char *from, *to;

        from = conf_text(x, kn, kn->start_mark, path, "a model name");
        if (from == NULL) {
            continue;
        }
        conf_path(sub, sizeof(sub), path, from);
        if (conf_dup(x, v, p)) {
            conf_err(x, kn->start_mark, sub, "duplicate key");
            continue;
        }
        to = conf_text(x, vn, kn->start_mark, sub, "a model name");
        if (to == NULL) {
            continue;
        }
        if (*from == '\0' || *to == '\0') {
            conf_err(x, kn->start_mark, sub, "model names must not be empty");
            continue;
        }
        models[*cnt].from = conf_strdup(from);
        models[*cnt].to = conf_strdup(to);
        (*cnt)++;
    }
}

static void
conf_value(struct conf_ctx *x, const struct conf_key *k, void *base, yaml_node_t *v, yaml_mark_t m,
           const char *path)
{
    char why[160], got[128];
    const char *s;

    switch (k->type) {
    case CT_MAP:
        conf_map(x, k->sub, base, v, m, path);
        return;
    case CT_LIST:
        conf_list(x, k, base, v, m, path);
        return;
    case CT_STRLIST:
    case CT_RETRY_ON:
    case CT_DIALECTS:
        conf_words(x, k, base, v, m, path);
        return;
    case CT_MODELS:
        conf_models(x, k, base, v, m, path);
        return;
    default:
        break;
    }
    s = conf_text(x, v, m, path, "a single value");
    if (s == NULL) {
        return;
    }
    if (k->type == CT_STR && conf_is_null(v)) {
        s = "";
    }
    if (conf_store(k, base, s, why, sizeof(why)) < 0) {
        conf_err(x, m, path, "%s%s", why,
                 conf_got(v, (k->flags & CK_SECRET) != 0, got, sizeof(got)));
    }
}

/* ---- cross-field rules ---- */

/* Mark of key NAME in MAP, else FALLBACK. */
static yaml_mark_t
conf_mark(struct conf_ctx *x, yaml_node_t *map, const char *name, yaml_mark_t fallback)
{
    yaml_node_t *kn = NULL;

    return conf_lookup(x, map, name, &kn) != NULL ? kn->start_mark : fallback;
}

static void
conf_trim_slash(char *url)
{
    size_t n = strlen(url);

    while (n > 0 && url[n - 1] == '/') {
        url[--n] = '\0';
    }
}

/*
 * The dialects U takes: as listed, else both for api.deepseek.com (it
 * serves the Anthropic API under /anthropic) and OpenAI only elsewhere.
 */
static void
conf_upstream_dialects(struct conf_upstream *u)
{
    char host[256], why[160];

    if (u->dialects_listed) {
        u->dialects = u->dialects_listed;
    } else if (conf_url_host(u->url, host, sizeof(host), why, sizeof(why)) == 0 &&
               strcasecmp(host, "api.deepseek.com") == 0) {
        u->dialects = DIALECT_BIT(DIALECT_OPENAI) | DIALECT_BIT(DIALECT_ANTHROPIC);
    } else {
        u->dialects = DIALECT_BIT(DIALECT_OPENAI);
    }
}

static void
conf_check_upstream(struct conf_ctx *x, void *items, size_t i, yaml_node_t *map, const char *path)
{
    struct conf_upstream *u = items;
    char host[256], why[160], sub[CONF_PATH];
    size_t j;

    conf_trim_slash(u[i].url);
    conf_upstream_dialects(&u[i]);
    for (j = 0; j < i && u[i].name[0] != '\0'; j++) {
        if (strcmp(u[j].name, u[i].name) == 0) {
            conf_path(sub, sizeof(sub), path, "name");
            conf_err(x, conf_mark(x, map, "name", map->start_mark), sub,
                     "duplicate upstream name (got \"%s\")", u[i].name);
            break;
        }
    }
    if (u[i].insecure && conf_url_host(u[i].url, host, sizeof(host), why, sizeof(why)) == 0 &&
        !conf_is_loopback(host)) {
        conf_path(sub, sizeof(sub), path, "insecure");
        conf_err(x, conf_mark(x, map, "insecure", map->start_mark), sub,
                 "true is allowed only for a loopback url host "
                 "(127.x.x.x, ::1, localhost) (got \"%s\")",
                 host);
    }
}

static void
conf_check_client(struct conf_ctx *x, void *items, size_t i, yaml_node_t *map, const char *path)
{
    struct conf_client *c = items;
    char sub[CONF_PATH];
    size_t j;

    if (c[i].name[0] == '\0') {
        char nm[32];
        snprintf(nm, sizeof(nm), "client%zu", i);
        free(c[i].name);
        c[i].name = conf_strdup(nm);
    }
    for (j = 0; j < i && c[i].token_env[0] != '\0'; j++) {
        if (strcmp(c[j].token_env, c[i].token_env) == 0) {
            conf_path(sub, sizeof(sub), path, "token_env");
            conf_err(x, conf_mark(x, map, "token_env", map->start_mark), sub,
                     "duplicate client token_env (got \"%s\")", c[i].token_env);
            break;
        }
    }
    for (j = 0; j < i; j++) {
        if (strcmp(c[j].name, c[i].name) == 0) {
            conf_path(sub, sizeof(sub), path, "name");
            conf_err(x, conf_mark(x, map, "name", map->start_mark), sub,
                     "duplicate client name (got \"%s\")", c[i].name);
            break;
        }
    }
    /* either every client logs in with a token, or none does (then X-Dsgate-Client tells them apart) */
    if (i > 0 && (c[0].token_env[0] == '\0') != (c[i].token_env[0] == '\0')) {
        conf_path(sub, sizeof(sub), path, "token_env");
        conf_err(x, conf_mark(x, map, "token_env", map->start_mark), sub,
                 "clients with and without token_env cannot be mixed: with tokens, a request "
                 "without one is refused (401); without, X-Dsgate-Client names the client");
    } else if (c[i].token_env[0] != '\0' && strcmp(c[i].name, "default") == 0) {
        conf_path(sub, sizeof(sub), path, "name");
        conf_err(x, conf_mark(x, map, "name", map->start_mark), sub,
                 "\"default\" is the client of requests without a token; it has no token_env");
    }
}

static void
conf_check_all(struct conf_ctx *x, struct conf *c, yaml_node_t *root)
{
    yaml_node_t *retry = conf_lookup(x, root, "retry", NULL);
    yaml_mark_t m = conf_mark(x, root, "retry", root->start_mark);
    char lo[32], hi[32];

    if (c->retry.cap_ms < c->retry.base_ms) {
        conf_fmt_dur(c->retry.cap_ms, lo, sizeof(lo));
        conf_fmt_dur(c->retry.base_ms, hi, sizeof(hi));
        m = conf_mark(x, retry, "base", m);
        conf_err(x, conf_mark(x, retry, "cap", m), "retry.cap",
                 "must not be less than retry.base (%s) (got \"%s\")", hi, lo);
    }
    if (c->admin_listen[0] != '\0' && strcmp(c->admin_listen, c->listen) == 0 &&
        strcmp(c->listen + strlen(c->listen) - 2, ":0") != 0) {
        conf_err(x, conf_mark(x, root, "admin_listen", root->start_mark), "admin_listen",
                 "must differ from listen (got \"%s\")", c->admin_listen);
    }
}

/* ---- entry points ---- */

static void
conf_syntax(struct conf_ctx *x, const yaml_parser_t *p, const char *text, size_t len)
{
    yaml_mark_t m = p->problem_mark;
    size_t i;

    x->nerr++;
    if (p->error == YAML_READER_ERROR) {
        m.line = m.column = 0;
        for (i = 0; i < p->problem_offset && i < len; i++) {
            m.line += text[i] == '\n';
            m.column = text[i] == '\n' ? 0 : m.column + 1;
        }
    }
    if (p->error == YAML_MEMORY_ERROR) {
        conf_append(&x->err, &x->len, "%s: out of memory", x->name);
    } else if (p->context != NULL) {
        conf_append(&x->err, &x->len, "%s:%zu:%zu: YAML syntax error: %s (%s at %zu:%zu)", x->name,
                    (size_t)m.line + 1, (size_t)m.column + 1, p->problem, p->context,
                    (size_t)p->context_mark.line + 1, (size_t)p->context_mark.column + 1);
    } else {
        conf_append(&x->err, &x->len, "%s:%zu:%zu: YAML syntax error: %s", x->name,
                    (size_t)m.line + 1, (size_t)m.column + 1,
                    p->problem != NULL ? p->problem : "unknown problem");
    }
}

struct conf *
conf_parse(const char *name, const char *text, size_t len, char **err)
{
    struct conf_ctx x = {.name = name != NULL ? name : "<config>"};
    struct conf *c = conf_defaults();
    yaml_parser_t parser;
    yaml_document_t doc, next;
    yaml_node_t *root;
    char got[128];

    if (!yaml_parser_initialize(&parser)) {
        conf_append(&x.err, &x.len, "%s: out of memory", x.name);
        x.nerr++;
        goto out;
    }
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, &doc)) {
        conf_syntax(&x, &parser, text, len);
        yaml_parser_delete(&parser);
        goto out;
    }
    x.doc = &doc;
    root = yaml_document_get_root_node(&doc);
    if (root != NULL && !conf_is_null(root)) {
        if (root->type != YAML_MAPPING_NODE) {
            conf_err(&x, root->start_mark, "(top level)", "must be a map of keys%s",
                     conf_got(root, false, got, sizeof(got)));
        } else {
            conf_map(&x, conf_keys, c, root, root->start_mark, "");
            conf_check_all(&x, c, root);
        }
    }
    if (!yaml_parser_load(&parser, &next)) {
        conf_syntax(&x, &parser, text, len);
    } else {
        root = yaml_document_get_root_node(&next);
        if (root != NULL) {
            conf_err(&x, root->start_mark, "(top level)", "only one YAML document is allowed");
        }
        yaml_document_delete(&next);
    }
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
out:
    if (x.nerr > 0) {
        conf_free(c);
        c = NULL;
    }
    if (err != NULL) {
        *err = x.err;
    } else {
        free(x.err);
    }
    return c;
}

/* Whole file into a malloc'd buffer; -1 with *ERR naming file and errno. */
static int
conf_read(const char *file, char **text, size_t *len, char **err)
{
    size_t cap = 0, n = 0, got;
    char *buf = NULL, *p;
    FILE *f = fopen(file, "rb");

    if (f == NULL) {
        conf_append(err, &cap, "%s: cannot open: %s", file, strerror(errno));
        return -1;
    }
    buf = conf_alloc(CONF_MAX_FILE + 1);
    while ((got = fread(buf + n, 1, CONF_MAX_FILE + 1 - n, f)) > 0) {
        n += got;
        if (n > CONF_MAX_FILE) {
            break;
        }
    }
    if (ferror(f) || n > CONF_MAX_FILE) {
        if (n > CONF_MAX_FILE) {
            conf_append(err, &cap, "%s: larger than %d bytes", file, CONF_MAX_FILE);
        } else {
            conf_append(err, &cap, "%s: cannot read: %s", file, strerror(errno));
        }
        fclose(f);
        free(buf);
        return -1;
    }
    fclose(f);
    p = realloc(buf, n + 1);
    *text = p != NULL ? p : buf;
    (*text)[n] = '\0';
    *len = n;
    return 0;
}

struct conf *
conf_load(const char *file, char **err)
{
    struct conf *c;
    char *text, *e = NULL;
    size_t len;

    if (file == NULL) {
        c = conf_defaults();
    } else {
        if (conf_read(file, &text, &len, &e) < 0) {
            c = NULL;
        } else {
            c = conf_parse(file, text, len, &e);
            free(text);
        }
        if (c != NULL) {
            c->file = conf_strdup(file);
        }
    }
    if (c != NULL && conf_apply_env(c, &e) < 0) {
        conf_free(c);
        c = NULL;
    }
    if (err != NULL) {
        *err = e;
    } else {
        free(e);
    }
    return c;
}

/* Values of DSGATE_* may hold credentials: messages never quote them. */
int
conf_apply_env(struct conf *c, char **err)
{
    const char *listen = getenv("DSGATE_LISTEN");
    const char *up = getenv("DSGATE_UPSTREAM");
    const char *redis = getenv("DSGATE_REDIS_URL");
    char why[160], host[256], *e = NULL;
    size_t len = 0, i;

    if (listen != NULL && *listen != '\0' && conf_check_listen(listen, why, sizeof(why)) < 0) {
        conf_append(&e, &len, "DSGATE_LISTEN: %s", why);
    }
    if (up != NULL && *up != '\0') {
        if (conf_url_host(up, host, sizeof(host), why, sizeof(why)) < 0) {
            conf_append(&e, &len, "DSGATE_UPSTREAM: %s", why);
        } else if (c->upstreams[0].insecure && !conf_is_loopback(host)) {
            conf_append(&e, &len,
                        "DSGATE_UPSTREAM: upstreams[0].insecure is allowed "
                        "only for a loopback url host (127.x.x.x, ::1, localhost)");
        }
    }
    if (redis != NULL && *redis != '\0' && conf_check_redis(redis, why, sizeof(why)) < 0) {
        conf_append(&e, &len, "DSGATE_REDIS_URL: %s", why);
    }
    if (err != NULL) {
        *err = e;
    } else {
        free(e);
    }
    if (e != NULL) {
        return -1;
    }
    if (listen != NULL && *listen != '\0') {
        free(c->listen);
        c->listen = conf_strdup(listen);
    }
    if (up != NULL && *up != '\0') {
        /* keep the first upstream's settings, with this url; drop the rest */
        for (i = 1; i < c->nupstreams; i++) {
            conf_free_keys(conf_upstream_keys, &c->upstreams[i]);
        }
        c->nupstreams = 1;
        free(c->upstreams[0].url);
        c->upstreams[0].url = conf_strdup(up);
        conf_trim_slash(c->upstreams[0].url);
        conf_upstream_dialects(&c->upstreams[0]);
    }
    if (redis != NULL && *redis != '\0') {
        free(c->cache.redis_url);
        c->cache.redis_url = conf_strdup(redis);
    }
    return 0;
}

static void
conf_reload_keys(const struct conf_key *tab, const void *a, const void *b, const char *path,
                 char **e, size_t *len)
{
    const struct conf_key *k;
    char sub[CONF_PATH];

    for (k = tab; k->name != NULL; k++) {
        conf_path(sub, sizeof(sub), path, k->name);
        if (k->type == CT_MAP) {
            conf_reload_keys(k->sub, a, b, sub, e, len);
        } else if ((k->flags & CK_NORELOAD) && k->type == CT_STR &&
                   strcmp(*FIELD(a, k->off, char *), *FIELD(b, k->off, char *)) != 0) {
            conf_append(e, len, "%s: cannot change on reload; restart dsgate to apply it", sub);
        }
    }
}

int
conf_check_reload(const struct conf *old, const struct conf *next, char **err)
{
    char *e = NULL;
    size_t len = 0;

    conf_reload_keys(conf_keys, old, next, "", &e, &len);
    if (err != NULL) {
        *err = e;
    } else {
        free(e);
    }
    return e != NULL ? -1 : 0;
}
