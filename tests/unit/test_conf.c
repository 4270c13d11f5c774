/*
 * Unit tests for conf.c: defaults, the design.md example, the shipped
 * conf/dsgate.yaml, units, priorities, every validation error (each with its
 * line:col and key path), several errors in one pass, environment overrides,
 * insecure towards loopback only, duplicates and reload rules.  Most tests
 * are tables of input -> expected output.  Run from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "conf.h"
#include "dialect.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static struct conf *parse(const char *yaml, char **err)
{
    return conf_parse("t.yaml", yaml, strlen(yaml), err);
}

static size_t count_lines(const char *s)
{
    size_t n = 1;

    for (; *s; s++) {
        n += *s == '\n';
    }
    return n;
}

static void unset_env(void)
{
    unsetenv("DSGATE_LISTEN");
    unsetenv("DSGATE_UPSTREAM");
    unsetenv("DSGATE_REDIS_URL");
}

/* Every value of design.md's example (= the built-in defaults). */
static void expect_design_values(const struct conf *c)
{
    static const char *const paths[] = {
        "/chat/completions", "/v1/chat/completions", "/completions",
        "/v1/completions", "/embeddings", "/v1/embeddings",
        "/anthropic/v1/messages", "/v1/messages",
    };
    const struct conf_upstream *u = &c->upstreams[0];
    size_t i;

    assert_string_equal(c->listen, "127.0.0.1:8080");
    assert_string_equal(c->admin_listen, "");
    assert_int_equal(c->nupstreams, 1);
    assert_string_equal(u->name, "deepseek");
    assert_string_equal(u->url, "https://api.deepseek.com");
    assert_string_equal(u->api_key_env, "DEEPSEEK_API_KEY");
    assert_int_equal(u->max_inflight, 32);
    assert_true(u->adaptive);
    assert_int_equal(u->weight, 1);
    assert_int_equal(u->nmodels, 0);
    assert_int_equal(u->connect_ms, 5000);
    assert_int_equal(u->first_data_ms, 600000);
    assert_int_equal(u->idle_ms, 120000);
    assert_int_equal(u->total_ms, 0);
    assert_string_equal(u->ca_file, "");
    assert_false(u->insecure);
    assert_int_equal(u->dialects, DIALECT_BIT(DIALECT_OPENAI) | DIALECT_BIT(DIALECT_ANTHROPIC));
    assert_int_equal(c->routing, ROUTING_FAILOVER);

    assert_int_equal(c->queue.max_queued, 10000);
    assert_int_equal(c->queue.max_wait_ms, 300000);
    assert_int_equal(c->queue.default_priority, PRIO_MEDIUM);
    assert_int_equal(c->queue.aging_ms, 30000);

    assert_int_equal(c->retry.max_attempts, 5);
    assert_int_equal(c->retry.base_ms, 1000);
    assert_int_equal(c->retry.cap_ms, 30000);
    assert_int_equal(c->retry.jitter, JITTER_FULL);
    assert_int_equal(c->retry.non_status, 6);
    assert_int_equal(c->retry.on_status[0], 429);
    assert_int_equal(c->retry.on_status[1], 500);
    assert_int_equal(c->retry.on_status[2], 502);
    assert_int_equal(c->retry.on_status[3], 503);
    assert_int_equal(c->retry.on_status[4], 504);
    assert_int_equal(c->retry.on_status[5], 529);
    assert_true(c->retry.on_connect);
    assert_true(c->retry.on_timeout);
    assert_true(c->retry.budget == 0.5);

    assert_true(c->cache.enabled);
    assert_int_equal(c->cache.ttl_ms, 24 * 3600 * 1000);
    assert_int_equal(c->cache.max_entries, 1024);
    assert_int_equal(c->cache.max_bytes, 64 * 1024 * 1024);
    assert_string_equal(c->cache.redis_url, "");
    assert_string_equal(c->cache.redis_prefix, "dsgate:");
    assert_int_equal(c->cache.redis_timeout_ms, 50);
    assert_false(c->cache.shared);
    assert_int_equal(c->cache.npaths, NELEM(paths));
    for (i = 0; i < NELEM(paths); i++) {
        assert_string_equal(c->cache.paths[i], paths[i]);
    }

    assert_int_equal(c->compat.reasoning_content, COMPAT_REASONING_OFF);
    assert_int_equal(c->compat.max_entries, 4096);
    assert_int_equal(c->compat.max_bytes, 32 * 1024 * 1024);
    assert_int_equal(c->compat.max_reasoning, 1024 * 1024);

    assert_string_equal(c->fleet.redis, "");
    assert_int_equal(c->fleet.lease_ttl_ms, 30000);
    assert_int_equal(c->fleet.fallback_instances, 4);

    assert_int_equal(c->limits.max_body, 8 * 1024 * 1024);
    assert_int_equal(c->limits.max_headers, 64 * 1024);
    assert_int_equal(c->limits.max_connections, 10000);
    assert_int_equal(c->limits.header_timeout_ms, 10000);
    assert_int_equal(c->limits.body_timeout_ms, 60000);
    assert_int_equal(c->limits.idle_timeout_ms, 60000);
    assert_int_equal(c->shutdown_timeout_ms, 30000);
    assert_int_equal(c->log.level, LOG_INFO);
    assert_int_equal(c->log.format, LOG_FORMAT_JSON);
    assert_string_equal(c->log.file, "");
}

static void test_defaults(void **state)
{
    struct conf *c = conf_defaults();
    char *err = (char *)1;

    (void)state;
    expect_design_values(c);
    assert_null(c->file);
    assert_int_equal(c->nclients, 0);
    conf_free(c);

    unset_env();
    c = conf_load(NULL, &err);
    assert_non_null(c);
    assert_null(err);
    expect_design_values(c);
    conf_free(c);

    /* an empty file, comments only, or empty sections: all defaults */
    c = parse("", &err);
    assert_non_null(c);
    expect_design_values(c);
    conf_free(c);
    c = parse("# nothing\nqueue:\nretry: ~\nclients:\nlog: {}\n", &err);
    assert_non_null(c);
    assert_null(err);
    expect_design_values(c);
    conf_free(c);
    conf_free(NULL);
}

static const char design_example[] =
    "listen: 127.0.0.1:8080\n"
    "upstreams:                      # tried in order (failover) or by weight\n"
    "  - name: deepseek\n"
    "    url: https://api.deepseek.com\n"
    "    api_key_env: DEEPSEEK_API_KEY   # if set, replaces the client's Authorization\n"
    "    max_inflight: 32                # concurrency limit toward this upstream\n"
    "    adaptive: true                  # lower the limit on 503/429, raise it on success\n"
    "    weight: 1\n"
    "    models: {}                      # optional\n"
    "    dialects: [openai, anthropic]   # default; other hosts: [openai]\n"
    "    timeouts: {connect: 5s, first_data: 600s, idle: 120s, total: 0}   # 0: none\n"
    "queue:\n"
    "  max_queued: 10000\n"
    "  max_wait: 300s\n"
    "  default_priority: medium\n"
    "  aging: 30s                      # a waiting request moves up one class per period\n"
    "retry:\n"
    "  max_attempts: 5                 # including the first\n"
    "  base: 1s\n"
    "  cap: 30s\n"
    "  jitter: full                    # full | equal | decorrelated | none\n"
    "  on: [429, 500, 502, 503, 504, 529, connect, timeout]\n"
    "  budget: 0.5                     # retries at most 50% of recent first attempts\n"
    "cache:\n"
    "  enabled: true\n"
    "  ttl: 24h\n"
    "  memory: {max_entries: 1024, max_bytes: 64MB}\n"
    "  redis: {url: \"\", prefix: \"dsgate:\", timeout: 50ms}   # empty url: memory only\n"
    "  shared: false                   # false: entries are scoped per client credential\n"
    "  paths: [/chat/completions, /v1/chat/completions, /completions, /v1/completions, "
    "/embeddings, /v1/embeddings, /anthropic/v1/messages, /v1/messages]\n"
    "routing: failover                # failover | weighted\n"
    "fleet:                            # optional: many instances sharing one account\n"
    "  redis: \"\"                       # empty: off\n"
    "  lease_ttl: 30s                  # a dead instance's leases expire after this\n"
    "  fallback_instances: 4           # Redis unreachable: local limit = max_inflight / this\n"
    "clients:                          # optional local tokens; empty: no client auth\n"
    "  - {token_env: APP1_TOKEN, priority: high}\n"
    "limits:\n"
    "  max_body: 8MB\n"
    "  max_headers: 64KB\n"
    "  max_connections: 10000\n"
    "  header_timeout: 10s\n"
    "  body_timeout: 60s\n"
    "  idle_timeout: 60s\n"
    "shutdown_timeout: 30s             # SIGTERM drain deadline\n"
    "log: {level: info, format: json, file: \"\"}   # empty file: stderr\n"
    "admin_listen: \"\"                  # optional separate address\n";

static void test_design_example(void **state)
{
    char *err = NULL;
    struct conf *c = parse(design_example, &err);

    (void)state;
    assert_null(err);
    assert_non_null(c);
    expect_design_values(c);
    assert_int_equal(c->nclients, 1);
    assert_string_equal(c->clients[0].token_env, "APP1_TOKEN");
    assert_int_equal(c->clients[0].priority, PRIO_HIGH);
    conf_free(c);
}

static void test_shipped_file(void **state)
{
    char *err = NULL;
    struct conf *c;

    (void)state;
    unset_env();
    c = conf_load("conf/dsgate.yaml", &err);
    if (c == NULL) {
        print_error("conf/dsgate.yaml: %s\n", err ? err : "(no message)");
    }
    assert_non_null(c);
    assert_null(err);
    assert_string_equal(c->file, "conf/dsgate.yaml");
    expect_design_values(c);
    assert_int_equal(c->nclients, 0);
    conf_free(c);
}

static void test_load_errors(void **state)
{
    char *err = NULL;

    (void)state;
    assert_null(conf_load("/nonexistent/dsgate.yaml", &err));
    assert_string_equal(err, "/nonexistent/dsgate.yaml: cannot open: No such file or directory");
    free(err);
    assert_null(conf_load("conf", &err));
    assert_string_equal(err, "conf: cannot read: Is a directory");
    free(err);
    assert_null(conf_load("/nonexistent", NULL));    /* err may be NULL */
}

/* ---- units and names ---- */

static void test_durations(void **state)
{
    static const struct { const char *in; int rc; int64_t ms; } t[] = {
        {"0", 0, 0}, {"0s", 0, 0}, {"250ms", 0, 250}, {"5s", 0, 5000},
        {"2m", 0, 120000}, {"24h", 0, 86400000}, {"007s", 0, 7000},
        {"9223372036854775807ms", 0, INT64_MAX},
        {"2562047788015h", 0, INT64_C(2562047788015) * 3600000},
        {"9223372036854775808ms", -1, 0}, {"9223372036854775807s", -1, 0},
        {"2562047788016h", -1, 0}, {"99999999999999999999999h", -1, 0},
        {"", -1, 0}, {"5", -1, 0}, {"-5s", -1, 0}, {"+5s", -1, 0},
        {"5 s", -1, 0}, {" 5s", -1, 0}, {"1.5s", -1, 0}, {"5S", -1, 0},
        {"5d", -1, 0}, {"s", -1, 0}, {"ms", -1, 0}, {"5sec", -1, 0},
        {"5s5", -1, 0}, {"0x10s", -1, 0},
    };
    size_t i;
    int64_t ms;

    (void)state;
    for (i = 0; i < NELEM(t); i++) {
        ms = -42;
        if (conf_parse_duration(t[i].in, &ms) != t[i].rc
            || (t[i].rc == 0 && ms != t[i].ms)) {
            fail_msg("duration \"%s\": want rc %d ms %lld, got ms %lld", t[i].in,
                     t[i].rc, (long long)t[i].ms, (long long)ms);
        }
    }
    assert_int_equal(conf_parse_duration(NULL, &ms), -1);
}

static void test_sizes(void **state)
{
    static const struct { const char *in; int rc; int64_t bytes; } t[] = {
        {"0", 0, 0}, {"512", 0, 512}, {"64KB", 0, 65536}, {"1kb", 0, 1024},
        {"8MB", 0, 8 << 20}, {"8mb", 0, 8 << 20}, {"1GB", 0, 1 << 30},
        {"8589934591GB", 0, INT64_C(8589934591) << 30},
        {"9223372036854775807", 0, INT64_MAX},
        {"8589934592GB", -1, 0}, {"9223372036854775808", -1, 0},
        {"", -1, 0}, {"-1", -1, 0}, {"1.5MB", -1, 0}, {"1TB", -1, 0},
        {"1 KB", -1, 0}, {"KB", -1, 0}, {"1K", -1, 0}, {"1B", -1, 0},
        {"8MBs", -1, 0},
    };
    size_t i;
    int64_t b;

    (void)state;
    for (i = 0; i < NELEM(t); i++) {
        b = -42;
        if (conf_parse_size(t[i].in, &b) != t[i].rc
            || (t[i].rc == 0 && b != t[i].bytes)) {
            fail_msg("size \"%s\": want rc %d bytes %lld, got %lld", t[i].in,
                     t[i].rc, (long long)t[i].bytes, (long long)b);
        }
    }
    assert_int_equal(conf_parse_size(NULL, &b), -1);
}

static void test_priorities(void **state)
{
    static const struct { const char *in; int rc; enum prio p; } t[] = {
        {"high", 0, PRIO_HIGH}, {"HIGH", 0, PRIO_HIGH}, {"Medium", 0, PRIO_MEDIUM},
        {"low", 0, PRIO_LOW}, {"", -1, 0}, {"urgent", -1, 0}, {"hi", -1, 0},
        {"high ", -1, 0}, {NULL, -1, 0},
    };
    size_t i;
    enum prio p;

    (void)state;
    for (i = 0; i < NELEM(t); i++) {
        p = PRIO_COUNT;
        if (conf_parse_priority(t[i].in, &p) != t[i].rc || (t[i].rc == 0 && p != t[i].p)) {
            fail_msg("priority \"%s\"", t[i].in ? t[i].in : "(null)");
        }
    }
    assert_string_equal(conf_priority_name(PRIO_HIGH), "high");
    assert_string_equal(conf_priority_name(PRIO_MEDIUM), "medium");
    assert_string_equal(conf_priority_name(PRIO_LOW), "low");
    assert_string_equal(conf_priority_name((enum prio)7), "unknown");
}

static void test_hostport(void **state)
{
    static const struct { const char *in; int rc; const char *host; int port; } t[] = {
        {"127.0.0.1:8080", 0, "127.0.0.1", 8080}, {"localhost:0", 0, "localhost", 0},
        {"[::1]:443", 0, "::1", 443}, {"0.0.0.0:65535", 0, "0.0.0.0", 65535},
        {"my-host.example:1", 0, "my-host.example", 1},
        {"8080", -1, NULL, 0}, {":8080", -1, NULL, 0}, {"h:", -1, NULL, 0},
        {"h:65536", -1, NULL, 0}, {"h:-1", -1, NULL, 0}, {"h:80x", -1, NULL, 0},
        {"h:000080", -1, NULL, 0}, {"::1:80", -1, NULL, 0}, {"[::1]80", -1, NULL, 0},
        {"[::1", -1, NULL, 0}, {"[]:80", -1, NULL, 0}, {"a b:80", -1, NULL, 0},
        {"", -1, NULL, 0},
    };
    char host[64];
    size_t i;
    int port;

    (void)state;
    for (i = 0; i < NELEM(t); i++) {
        port = -1;
        if (conf_parse_hostport(t[i].in, host, sizeof(host), &port) != t[i].rc
            || (t[i].rc == 0 && (strcmp(host, t[i].host) != 0 || port != t[i].port))) {
            fail_msg("hostport \"%s\"", t[i].in);
        }
    }
    assert_int_equal(conf_parse_hostport("averylonghostname:1", host, 8, &port), -1);
}

/* ---- errors: each row is one config with exactly one problem ---- */

static const struct {
    const char *yaml;
    const char *want;           /* the whole message */
} error_rows[] = {
    {"listen: 8080\n",
     "t.yaml:1:1: listen: must be host:port with a port from 0 to 65535 (got \"8080\")"},
    {"listen: 127.0.0.1:65536\n",
     "t.yaml:1:1: listen: must be host:port with a port from 0 to 65535 (got \"127.0.0.1:65536\")"},
    {"listen: [a]\n", "t.yaml:1:1: listen: must be a single value (got a list)"},
    {"listen: {a: 1}\n", "t.yaml:1:1: listen: must be a single value (got a map)"},
    {"admin_listen: nohost\n",
     "t.yaml:1:1: admin_listen: must be host:port with a port from 0 to 65535 (got \"nohost\")"},
    {"listen: 127.0.0.1:9000\nadmin_listen: 127.0.0.1:9000\n",
     "t.yaml:2:1: admin_listen: must differ from listen (got \"127.0.0.1:9000\")"},
    {"bogus: 1\n", "t.yaml:1:1: bogus: unknown key"},
    {"queue:\n  max_wiat: 5s\n", "t.yaml:2:3: queue.max_wiat: unknown key"},
    {"queue: 5\n", "t.yaml:1:1: queue: must be a map (got \"5\")"},
    {"queue: [1]\n", "t.yaml:1:1: queue: must be a map (got a list)"},
    {"queue:\n  max_wait: 5\n",
     "t.yaml:2:3: queue.max_wait: must be a duration such as 250ms, 5s, 2m or 24h (got \"5\")"},
    {"queue:\n  max_wait: 0\n",
     "t.yaml:2:3: queue.max_wait: must be between 1ms and 24h (got \"0\")"},
    {"queue:\n  max_wait: 99999999999999999999s\n",
     "t.yaml:2:3: queue.max_wait: must be a duration such as 250ms, 5s, 2m or 24h "
     "(got \"99999999999999999999s\")"},
    {"queue:\n  max_queued: -1\n",
     "t.yaml:2:3: queue.max_queued: must be between 0 and 1000000 (got \"-1\")"},
    {"queue:\n  max_queued: 1.5\n",
     "t.yaml:2:3: queue.max_queued: must be a whole number (got \"1.5\")"},
    {"queue:\n  max_queued: 99999999999999999999\n",
     "t.yaml:2:3: queue.max_queued: must be a whole number (got \"99999999999999999999\")"},
    {"queue: {default_priority: urgent}\n",
     "t.yaml:1:9: queue.default_priority: must be one of high, medium, low (got \"urgent\")"},
    {"queue: {aging: 25h}\n", "t.yaml:1:9: queue.aging: must be between 0 and 24h (got \"25h\")"},
    {"upstreams: []\n", "t.yaml:1:1: upstreams: must have 1 to 64 entries (got 0)"},
    {"upstreams:\n", "t.yaml:1:1: upstreams: must have 1 to 64 entries (got 0)"},
    {"upstreams: {name: a}\n", "t.yaml:1:1: upstreams: must be a list (got a map)"},
    {"upstreams: [x]\n", "t.yaml:1:13: upstreams[0]: must be a map (got \"x\")"},
    {"upstreams:\n  - name: a\n", "t.yaml:2:5: upstreams[0].url: is required"},
    {"upstreams:\n  - url: http://x\n", "t.yaml:2:5: upstreams[0].name: is required"},
    {"upstreams:\n  - name: \"\"\n    url: http://a\n",
     "t.yaml:2:5: upstreams[0].name: must not be empty (got \"\")"},
    {"upstreams:\n  - name: a b\n    url: http://a\n",
     "t.yaml:2:5: upstreams[0].name: must be 1 to 64 letters, digits, '.', '_' or '-' (got \"a b\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n  - name: b\n    url: http://b\n"
     "    max_inflight: 0\n",
     "t.yaml:6:5: upstreams[1].max_inflight: must be between 1 and 10000 (got \"0\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n    weight: 1001\n",
     "t.yaml:4:5: upstreams[0].weight: must be between 1 and 1000 (got \"1001\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n    adaptive: yes\n",
     "t.yaml:4:5: upstreams[0].adaptive: must be true or false (got \"yes\")"},
    {"upstreams:\n  - name: a\n    url: ftp://a\n",
     "t.yaml:3:5: upstreams[0].url: must start with http:// or https:// (got \"ftp://a\")"},
    {"upstreams:\n  - name: a\n    url: http://\n",
     "t.yaml:3:5: upstreams[0].url: must name a host (got \"http://\")"},
    {"upstreams:\n  - name: a\n    url: http://:80/v1\n",
     "t.yaml:3:5: upstreams[0].url: must name a host (got \"http://:80/v1\")"},
    {"upstreams:\n  - name: a\n    url: http://a:0\n",
     "t.yaml:3:5: upstreams[0].url: must have a port from 1 to 65535 (got \"http://a:0\")"},
    {"upstreams:\n  - name: a\n    url: http://a:99999\n",
     "t.yaml:3:5: upstreams[0].url: must have a port from 1 to 65535 (got \"http://a:99999\")"},
    {"upstreams:\n  - name: a\n    url: http://a/v1?x=1\n",
     "t.yaml:3:5: upstreams[0].url: must not have a query or fragment (got \"http://a/v1?x=1\")"},
    {"upstreams:\n  - name: a\n    url: \"http://a b\"\n",
     "t.yaml:3:5: upstreams[0].url: must not contain spaces or control characters (got \"http://a b\")"},
    {"upstreams:\n  - name: a\n    url: http://[zz]:80\n",
     "t.yaml:3:5: upstreams[0].url: has a malformed [IPv6] host (got \"http://[zz]:80\")"},
    {"upstreams:\n  - name: a\n    url: http://user:secret@a\n",
     "t.yaml:3:5: upstreams[0].url: must not contain user:password@ (use api_key_env) "
     "(got \"http://***@a\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n    api_key_env: 1BAD\n",
     "t.yaml:4:5: upstreams[0].api_key_env: must be the name of an environment variable "
     "(letters, digits, _) (got \"1BAD\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n    api_key_env: sk-abc\n",
     "t.yaml:4:5: upstreams[0].api_key_env: must be the name of an environment variable "
     "(letters, digits, _) (got \"sk-abc\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n    models: [x]\n",
     "t.yaml:4:5: upstreams[0].models: must be a map of model names (got a list)"},
    {"upstreams:\n  - name: a\n    url: http://a\n    models: {x: \"\"}\n",
     "t.yaml:4:14: upstreams[0].models.x: model names must not be empty"},
    {"upstreams:\n  - name: a\n    url: http://a\n    models: {x: [y]}\n",
     "t.yaml:4:14: upstreams[0].models.x: must be a model name (got a list)"},
    {"upstreams:\n  - name: a\n    url: http://a\n    models: {x: y, x: z}\n",
     "t.yaml:4:20: upstreams[0].models.x: duplicate key"},
    {"upstreams:\n  - name: a\n    url: http://a\n    dialects: [openai, claude]\n",
     "t.yaml:4:24: upstreams[0].dialects[1]: must be one of openai, anthropic (got \"claude\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n    dialects: [openai, OpenAI]\n",
     "t.yaml:4:24: upstreams[0].dialects[1]: is listed twice (got \"OpenAI\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n    dialects: []\n",
     "t.yaml:4:5: upstreams[0].dialects: must have 1 to 2 entries (got 0)"},
    {"upstreams:\n  - name: a\n    url: http://a\n    dialects:\n",
     "t.yaml:4:5: upstreams[0].dialects: must have 1 to 2 entries (got 0)"},
    {"upstreams:\n  - name: a\n    url: http://a\n    dialects: anthropic\n",
     "t.yaml:4:5: upstreams[0].dialects: must be a list (got \"anthropic\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n    timeouts: {connect: 0}\n",
     "t.yaml:4:16: upstreams[0].timeouts.connect: must be between 1ms and 5m (got \"0\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n    timeouts: {total: 25h}\n",
     "t.yaml:4:16: upstreams[0].timeouts.total: must be between 0 and 24h (got \"25h\")"},
    {"upstreams:\n  - name: a\n    url: http://a\n    timeouts: {first: 1s}\n",
     "t.yaml:4:16: upstreams[0].timeouts.first: unknown key"},
    {"upstreams:\n  - name: a\n    url: http://a\n    timeouts: 5s\n",
     "t.yaml:4:5: upstreams[0].timeouts: must be a map (got \"5s\")"},
    {"upstreams:\n  - {name: a, url: \"http://a\"}\n  - {name: a, url: \"http://b\"}\n",
     "t.yaml:3:6: upstreams[1].name: duplicate upstream name (got \"a\")"},
    {"upstreams:\n  - name: a\n    url: https://api.example.com/v1\n    insecure: true\n",
     "t.yaml:4:5: upstreams[0].insecure: true is allowed only for a loopback url host "
     "(127.x.x.x, ::1, localhost) (got \"api.example.com\")"},
    {"routing: random\n",
     "t.yaml:1:1: routing: must be one of failover, weighted (got \"random\")"},
    {"retry: {max_attempts: 21}\n",
     "t.yaml:1:9: retry.max_attempts: must be between 1 and 20 (got \"21\")"},
    {"retry: {max_attempts: 0}\n",
     "t.yaml:1:9: retry.max_attempts: must be between 1 and 20 (got \"0\")"},
    {"retry: {budget: 10.5}\n", "t.yaml:1:9: retry.budget: must be between 0 and 10 (got \"10.5\")"},
    {"retry: {budget: -1}\n", "t.yaml:1:9: retry.budget: must be a number such as 0.5 (got \"-1\")"},
    {"retry: {budget: 1e3}\n", "t.yaml:1:9: retry.budget: must be a number such as 0.5 (got \"1e3\")"},
    {"retry: {budget: .}\n", "t.yaml:1:9: retry.budget: must be a number such as 0.5 (got \".\")"},
    {"compat: {reasoning_content: keep}\n",
     "t.yaml:1:10: compat.reasoning_content: must be one of off, restore (got \"keep\")"},
    {"compat: {memory: {max_entries: 0}}\n",
     "t.yaml:1:19: compat.memory.max_entries: must be between 1 and 10000000 (got \"0\")"},
    {"compat: {max_reasoning: 10}\n",
     "t.yaml:1:10: compat.max_reasoning: must be between 1KB and 1GB (got \"10\")"},
    {"retry: {jitter: some}\n",
     "t.yaml:1:9: retry.jitter: must be one of full, equal, decorrelated, none (got \"some\")"},
    {"retry:\n  on: [429, 600]\n",
     "t.yaml:2:13: retry.on[1]: must be an HTTP status from 100 to 599, connect or timeout (got \"600\")"},
    {"retry:\n  on: [99]\n",
     "t.yaml:2:8: retry.on[0]: must be an HTTP status from 100 to 599, connect or timeout (got \"99\")"},
    {"retry:\n  on: [retry]\n",
     "t.yaml:2:8: retry.on[0]: must be an HTTP status from 100 to 599, connect or timeout (got \"retry\")"},
    {"retry:\n  on: [429, 429]\n", "t.yaml:2:13: retry.on[1]: is listed twice (got \"429\")"},
    {"retry:\n  on: [connect, CONNECT]\n",
     "t.yaml:2:17: retry.on[1]: is listed twice (got \"CONNECT\")"},
    {"retry:\n  on: [[429]]\n", "t.yaml:2:8: retry.on[0]: must be a single value (got a list)"},
    {"retry:\n  on: 429\n", "t.yaml:2:3: retry.on: must be a list (got \"429\")"},
    {"retry:\n  on: [500, 501, 502, 503, 504, 505, 506, 507, 508, 509, 510, 511, 512,"
     " 513, 514, 515, 516]\n",
     "t.yaml:2:88: retry.on[16]: at most 16 status codes may be listed (got \"516\")"},
    {"retry:\n  base: 10s\n  cap: 5s\n",
     "t.yaml:3:3: retry.cap: must not be less than retry.base (10s) (got \"5s\")"},
    {"retry:\n  base: 1h\n",
     "t.yaml:2:3: retry.base: must be between 1ms and 10m (got \"1h\")"},
    {"cache: {ttl: 0}\n", "t.yaml:1:9: cache.ttl: must be between 1s and 8760h (got \"0\")"},
    {"cache: {enabled: 1}\n", "t.yaml:1:9: cache.enabled: must be true or false (got \"1\")"},
    {"cache:\n  memory: {max_bytes: 65GB}\n",
     "t.yaml:2:12: cache.memory.max_bytes: must be between 0 and 64GB (got \"65GB\")"},
    {"cache:\n  memory: {max_bytes: 1.5MB}\n",
     "t.yaml:2:12: cache.memory.max_bytes: must be a size such as 512, 64KB, 8MB or 1GB (got \"1.5MB\")"},
    {"cache:\n  memory: {max_entries: 10000001}\n",
     "t.yaml:2:12: cache.memory.max_entries: must be between 0 and 10000000 (got \"10000001\")"},
    {"cache:\n  redis: {timeout: 11s}\n",
     "t.yaml:2:11: cache.redis.timeout: must be between 1ms and 10s (got \"11s\")"},
    {"cache:\n  redis: {url: \"http://user:secret@h:6379\"}\n",
     "t.yaml:2:11: cache.redis.url: must be empty or a redis://, rediss:// or unix:// URL "
     "(got \"http://***@h:6379\")"},
    {"cache:\n  paths: [chat]\n",
     "t.yaml:2:11: cache.paths[0]: must be a path starting with '/' (no spaces, query or fragment) "
     "(got \"chat\")"},
    {"fleet: {lease_ttl: 500ms}\n",
     "t.yaml:1:9: fleet.lease_ttl: must be between 1s and 1h (got \"500ms\")"},
    {"fleet: {fallback_instances: 0}\n",
     "t.yaml:1:9: fleet.fallback_instances: must be between 1 and 1000 (got \"0\")"},
    {"fleet: {redis: \"localhost:6379\"}\n",
     "t.yaml:1:9: fleet.redis: must be empty or a redis://, rediss:// or unix:// URL "
     "(got \"localhost:6379\")"},
    {"clients:\n  - {token_env: A}\n  - {name: b}\n",
     "t.yaml:3:5: clients[1].token_env: clients with and without token_env cannot be mixed: "
     "with tokens, a request without one is refused (401); without, X-Dsgate-Client names "
     "the client"},
    {"clients:\n  - {name: App}\n",
     "t.yaml:2:6: clients[0].name: must be 1 to 64 lower-case letters, digits, '.', '_' or '-' "
     "(got \"App\")"},
    {"clients:\n  - {name: a}\n  - {name: a}\n",
     "t.yaml:3:6: clients[1].name: duplicate client name (got \"a\")"},
    {"clients:\n  - {token_env: A, name: default}\n",
     "t.yaml:2:20: clients[0].name: \"default\" is the client of requests without a token; it "
     "has no token_env"},
    {"clients:\n  - {name: a, weight: 0}\n",
     "t.yaml:2:15: clients[0].weight: must be between 1 and 1000 (got \"0\")"},
    {"clients:\n  - {name: a, over_limit: maybe}\n",
     "t.yaml:2:15: clients[0].over_limit: must be one of queue, reject (got \"maybe\")"},
    {"clients:\n  - {token_env: A, priority: urgent}\n",
     "t.yaml:2:20: clients[0].priority: must be one of high, medium, low (got \"urgent\")"},
    {"clients:\n  - {token_env: A}\n  - {token_env: A}\n",
     "t.yaml:3:6: clients[1].token_env: duplicate client token_env (got \"A\")"},
    {"clients:\n  - {token_env: A, token: x}\n", "t.yaml:2:20: clients[0].token: unknown key"},
    {"limits: {max_body: 512}\n",
     "t.yaml:1:10: limits.max_body: must be between 1KB and 1GB (got \"512\")"},
    {"limits: {max_headers: 2MB}\n",
     "t.yaml:1:10: limits.max_headers: must be between 1KB and 1MB (got \"2MB\")"},
    {"limits: {max_connections: 0}\n",
     "t.yaml:1:10: limits.max_connections: must be between 1 and 1000000 (got \"0\")"},
    {"limits: {header_timeout: 500ms}\n",
     "t.yaml:1:10: limits.header_timeout: must be between 1s and 1h (got \"500ms\")"},
    {"limits: {body_timeout: 0}\n",
     "t.yaml:1:10: limits.body_timeout: must be between 1s and 1h (got \"0\")"},
    {"limits: {idle_timeout: 2h}\n",
     "t.yaml:1:10: limits.idle_timeout: must be between 1s and 1h (got \"2h\")"},
    {"shutdown_timeout: 2h\n",
     "t.yaml:1:1: shutdown_timeout: must be between 0 and 1h (got \"2h\")"},
    {"log: {level: verbose}\n",
     "t.yaml:1:7: log.level: must be one of error, warn, info, debug (got \"verbose\")"},
    {"log: {format: xml}\n", "t.yaml:1:7: log.format: must be one of json, text (got \"xml\")"},
    {"log: {level: \"a\\tb\\\"\"}\n",
     "t.yaml:1:7: log.level: must be one of error, warn, info, debug (got \"a\\x09b\\x22\")"},
    {"log:\n  file: \"a\\0b\"\n", "t.yaml:2:3: log.file: must not contain NUL bytes"},
    {"listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n", "t.yaml:2:1: listen: duplicate key"},
    {"log: {level: info, level: warn}\n", "t.yaml:1:20: log.level: duplicate key"},
    {"? [a]\n: 1\n", "t.yaml:1:3: (top level): keys must be plain words (got a list)"},
    {"hello\n", "t.yaml:1:1: (top level): must be a map of keys (got \"hello\")"},
    {"listen: 127.0.0.1:1\n---\nlisten: 127.0.0.1:2\n",
     "t.yaml:3:1: (top level): only one YAML document is allowed"},
    {"queue:\n  max_wait: [1\n",
     "t.yaml:3:1: YAML syntax error: did not find expected ',' or ']' "
     "(while parsing a flow sequence at 2:13)"},
    {"a: b\n c: d\n",
     "t.yaml:2:3: YAML syntax error: mapping values are not allowed in this context"},
    {"a: \"\xff\"\n",
     "t.yaml:1:5: YAML syntax error: invalid leading UTF-8 octet"},
};

static void test_errors(void **state)
{
    size_t i, bad = 0;

    (void)state;
    for (i = 0; i < NELEM(error_rows); i++) {
        char *err = (char *)1;
        struct conf *c = parse(error_rows[i].yaml, &err);

        if (c != NULL || err == NULL || strcmp(err, error_rows[i].want) != 0) {
            print_error("row %zu: %s\n  want: %s\n  got:  %s\n", i, error_rows[i].yaml,
                        error_rows[i].want, err ? err : "(none)");
            bad++;
        }
        conf_free(c);
        free(err);
    }
    assert_int_equal(bad, 0);
}

/* Every problem in one pass: one line each, in file order. */
static void test_many_errors(void **state)
{
    static const char yaml[] =
        "listen: nope\n"                                    /* 1 */
        "upstreams:\n"
        "  - name: a\n"
        "    url: ftp://a\n"                                /* 4 */
        "    max_inflight: 0\n"                             /* 5 */
        "  - name: a\n"                                     /* 6: dup */
        "    url: http://b\n"
        "    insecure: true\n"                              /* 8 */
        "  - {url: http://c}\n"                             /* 9: no name */
        "queue: {max_wait: 5x, nope: 1}\n"                  /* 10 */
        "retry: {on: [1000], jitter: none, jitter: full}\n" /* 11 */
        "limits: {max_body: 2GB}\n"                         /* 12 */
        "extra: 1\n";                                       /* 13 */
    static const char *const want[] = {
        "t.yaml:1:1: listen: must be host:port",
        "t.yaml:4:5: upstreams[0].url: must start with http:// or https://",
        "t.yaml:5:5: upstreams[0].max_inflight: must be between 1 and 10000 (got \"0\")",
        "t.yaml:6:5: upstreams[1].name: duplicate upstream name (got \"a\")",
        "t.yaml:8:5: upstreams[1].insecure: true is allowed only for a loopback url host",
        "t.yaml:9:5: upstreams[2].name: is required",
        "t.yaml:10:9: queue.max_wait: must be a duration",
        "t.yaml:10:23: queue.nope: unknown key",
        "t.yaml:11:14: retry.on[0]: must be an HTTP status",
        "t.yaml:11:35: retry.jitter: duplicate key",
        "t.yaml:12:10: limits.max_body: must be between 1KB and 1GB (got \"2GB\")",
        "t.yaml:13:1: extra: unknown key",
    };
    char *err = NULL, *line, *save;
    size_t i = 0;

    (void)state;
    assert_null(parse(yaml, &err));
    assert_non_null(err);
    assert_int_equal(count_lines(err), NELEM(want));
    for (line = strtok_r(err, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, want[i], strlen(want[i])) != 0) {
            fail_msg("line %zu: want \"%s...\", got \"%s\"", i, want[i], line);
        }
        i++;
    }
    free(err);
}

static void test_too_many_errors(void **state)
{
    char yaml[8192], *err = NULL;
    size_t o = 0;
    int i;

    (void)state;
    for (i = 0; i < 150; i++) {
        o += (size_t)snprintf(yaml + o, sizeof(yaml) - o, "k%d: 1\n", i);
    }
    assert_null(parse(yaml, &err));
    assert_int_equal(count_lines(err), 101);
    assert_non_null(strstr(err, "t.yaml:100:1: k99: unknown key\nt.yaml: further errors not shown"));
    free(err);
}

/* ---- valid variants ---- */

static void test_valid(void **state)
{
    static const char yaml[] =
        "listen: \"[::1]:0\"\n"
        "admin_listen: \"[::1]:0\"\n"
        "routing: WEIGHTED\n"
        "upstreams:\n"
        "  - {name: local, url: 'http://127.0.0.1:8000/v1/', insecure: true,\n"
        "     models: {deepseek-v4-pro: DeepSeek-R1, \"a\": b}, api_key_env: \"\",\n"
        "     ca_file: /etc/ssl/x.pem}\n"
        "  - name: v6\n"
        "    url: https://[::1]:8443\n"
        "    weight: 3\n"
        "    insecure: true\n"
        "    timeouts: {idle: 0}\n"
        "  - {name: cloud.2_x, url: \"HTTPS://Cloud.Example.com:443/a/b//\"}\n"
        "retry: {on: [], budget: 0, base: 5ms, cap: 5ms, jitter: Decorrelated}\n"
        "cache: {paths: [], redis: {url: \"redis://:pw@127.0.0.1:6379/2\", prefix: \"\"}}\n"
        "fleet: {redis: \"unix:///run/redis.sock\"}\n"
        "compat: {reasoning_content: Restore, memory: {max_entries: 10, max_bytes: 1MB},"
        " max_reasoning: 64KB}\n"
        "clients:\n"
        "  - {token_env: APP1_TOKEN, priority: high}\n"
        "  - {token_env: _app2}\n"
        "log: {level: DEBUG, format: text, file: /var/log/dsgate.log}\n"
        "shutdown_timeout: 0\n";
    char *err = NULL;
    struct conf *c = parse(yaml, &err);

    (void)state;
    if (c == NULL) {
        fail_msg("%s", err);
    }
    assert_string_equal(c->listen, "[::1]:0");
    assert_int_equal(c->routing, ROUTING_WEIGHTED);
    assert_int_equal(c->nupstreams, 3);
    assert_string_equal(c->upstreams[0].url, "http://127.0.0.1:8000/v1");
    assert_true(c->upstreams[0].insecure);
    assert_string_equal(c->upstreams[0].api_key_env, "");
    assert_string_equal(c->upstreams[0].ca_file, "/etc/ssl/x.pem");
    assert_int_equal(c->upstreams[0].nmodels, 2);
    assert_string_equal(c->upstreams[0].models[0].from, "deepseek-v4-pro");
    assert_string_equal(c->upstreams[0].models[0].to, "DeepSeek-R1");
    assert_string_equal(c->upstreams[0].models[1].from, "a");
    assert_string_equal(c->upstreams[0].models[1].to, "b");
    /* missing keys of an item take the per-field defaults */
    assert_string_equal(c->upstreams[1].api_key_env, "DEEPSEEK_API_KEY");
    assert_int_equal(c->upstreams[1].max_inflight, 32);
    assert_int_equal(c->upstreams[1].weight, 3);
    assert_int_equal(c->upstreams[1].connect_ms, 5000);
    assert_int_equal(c->upstreams[1].first_data_ms, 600000);
    assert_int_equal(c->upstreams[1].idle_ms, 0);
    assert_string_equal(c->upstreams[2].name, "cloud.2_x");
    assert_string_equal(c->upstreams[2].url, "HTTPS://Cloud.Example.com:443/a/b");
    assert_false(c->upstreams[2].insecure);
    assert_string_equal(c->upstreams[2].ca_file, "");
    assert_int_equal(c->retry.non_status, 0);
    assert_false(c->retry.on_connect);
    assert_false(c->retry.on_timeout);
    assert_true(c->retry.budget == 0.0);
    assert_int_equal(c->retry.jitter, JITTER_DECORRELATED);
    assert_int_equal(c->cache.npaths, 0);
    assert_string_equal(c->cache.redis_url, "redis://:pw@127.0.0.1:6379/2");
    assert_string_equal(c->cache.redis_prefix, "");
    assert_string_equal(c->fleet.redis, "unix:///run/redis.sock");
    assert_int_equal(c->compat.reasoning_content, COMPAT_REASONING_RESTORE);
    assert_int_equal(c->compat.max_entries, 10);
    assert_int_equal(c->compat.max_bytes, 1024 * 1024);
    assert_int_equal(c->compat.max_reasoning, 64 * 1024);
    assert_int_equal(c->nclients, 2);
    assert_int_equal(c->clients[0].priority, PRIO_HIGH);
    assert_string_equal(c->clients[1].token_env, "_app2");
    assert_int_equal(c->clients[1].priority, PRIO_MEDIUM);
    assert_int_equal(c->log.level, LOG_DEBUG);
    assert_int_equal(c->log.format, LOG_FORMAT_TEXT);
    assert_string_equal(c->log.file, "/var/log/dsgate.log");
    assert_int_equal(c->shutdown_timeout_ms, 0);
    assert_null(c->file);
    conf_free(c);
}

/* Bounds are inclusive: the extreme values load. */
static void test_bounds_inclusive(void **state)
{
    static const char *const rows[] = {
        "upstreams: [{name: a, url: \"http://a\", max_inflight: 1, weight: 1000,"
        " timeouts: {connect: 1ms, first_data: 24h, total: 24h}}]\n",
        "upstreams: [{name: a, url: \"http://a\", max_inflight: 10000, weight: 1,"
        " timeouts: {connect: 5m, first_data: 0}}]\n",
        "queue: {max_queued: 0, max_wait: 1ms, aging: 0}\n",
        "queue: {max_queued: 1000000, max_wait: 24h, aging: 24h}\n",
        "retry: {max_attempts: 1, budget: 10, base: 10m, cap: 1h}\n",
        "retry: {max_attempts: 20, budget: 0.0, base: 1ms, cap: 1ms}\n",
        "cache: {ttl: 1s, memory: {max_entries: 0, max_bytes: 0}, redis: {timeout: 1ms}}\n",
        "cache: {ttl: 8760h, memory: {max_entries: 10000000, max_bytes: 64GB},"
        " redis: {timeout: 10s}}\n",
        "fleet: {lease_ttl: 1s, fallback_instances: 1}\n",
        "fleet: {lease_ttl: 1h, fallback_instances: 1000}\n",
        "limits: {max_body: 1KB, max_headers: 1KB, max_connections: 1,"
        " header_timeout: 1s, body_timeout: 1s, idle_timeout: 1s}\n",
        "limits: {max_body: 1GB, max_headers: 1MB, max_connections: 1000000,"
        " header_timeout: 1h, body_timeout: 1h, idle_timeout: 1h}\n",
        "shutdown_timeout: 1h\n",
        "retry: {on: [100, 599, 500, 501, 502, 503, 504, 505, 506, 507, 508, 509, 510,"
        " 511, 512, 513, connect, timeout]}\n",
    };
    size_t i;

    (void)state;
    for (i = 0; i < NELEM(rows); i++) {
        char *err = NULL;
        struct conf *c = parse(rows[i], &err);

        if (c == NULL) {
            print_error("row %zu: %s\n", i, err);
            free(err);
            fail();
        }
        conf_free(c);
    }
}

static void test_insecure(void **state)
{
    static const struct { const char *url; bool ok; } t[] = {
        {"http://127.0.0.1:8000", true}, {"https://127.1.2.3", true},
        {"https://localhost:8443/v1", true}, {"https://LOCALHOST", true},
        {"https://[::1]:8443", true}, {"https://[0:0:0:0:0:0:0:1]", true},
        {"https://128.0.0.1", false}, {"https://10.0.0.1", false},
        {"https://example.com", false}, {"https://localhost.example.com", false},
        {"https://127.example.com", false}, {"https://[::2]", false},
        {"https://127.1", false},
    };
    char yaml[256], *err;
    size_t i;

    (void)state;
    for (i = 0; i < NELEM(t); i++) {
        struct conf *c;

        snprintf(yaml, sizeof(yaml),
                 "upstreams:\n  - name: a\n    url: \"%s\"\n    insecure: true\n", t[i].url);
        err = NULL;
        c = parse(yaml, &err);
        if ((c != NULL) != t[i].ok
            || (!t[i].ok && (err == NULL || strstr(err, "t.yaml:4:5: upstreams[0].insecure:") == NULL))) {
            fail_msg("insecure toward %s: %s", t[i].url, err ? err : "(accepted)");
        }
        conf_free(c);
        free(err);
    }
}

/* ---- environment ---- */

static void test_env(void **state)
{
    static const char yaml[] =
        "listen: 127.0.0.1:1\n"
        "upstreams:\n"
        "  - {name: first, url: \"https://a.example\", max_inflight: 7, insecure: false,"
        " models: {x: y}}\n"
        "  - {name: second, url: \"https://b.example\"}\n";
    char *err = NULL;
    struct conf *c;

    (void)state;
    unset_env();
    setenv("DSGATE_LISTEN", "0.0.0.0:9000", 1);
    setenv("DSGATE_UPSTREAM", "http://127.0.0.1:9999/v1/", 1);
    setenv("DSGATE_REDIS_URL", "redis://127.0.0.1:6379/0", 1);

    c = conf_load(NULL, &err);
    assert_non_null(c);
    assert_null(err);
    assert_string_equal(c->listen, "0.0.0.0:9000");
    assert_int_equal(c->nupstreams, 1);
    assert_string_equal(c->upstreams[0].name, "deepseek");
    assert_string_equal(c->upstreams[0].url, "http://127.0.0.1:9999/v1");
    assert_string_equal(c->cache.redis_url, "redis://127.0.0.1:6379/0");
    conf_free(c);

    /* the first upstream keeps its settings and takes the URL; others go */
    c = parse(yaml, &err);
    assert_non_null(c);
    assert_int_equal(conf_apply_env(c, &err), 0);
    assert_null(err);
    assert_string_equal(c->listen, "0.0.0.0:9000");
    assert_int_equal(c->nupstreams, 1);
    assert_string_equal(c->upstreams[0].name, "first");
    assert_string_equal(c->upstreams[0].url, "http://127.0.0.1:9999/v1");
    assert_int_equal(c->upstreams[0].max_inflight, 7);
    assert_int_equal(c->upstreams[0].nmodels, 1);
    conf_free(c);

    /* empty variables are ignored */
    setenv("DSGATE_LISTEN", "", 1);
    setenv("DSGATE_UPSTREAM", "", 1);
    setenv("DSGATE_REDIS_URL", "", 1);
    c = conf_load(NULL, &err);
    assert_non_null(c);
    expect_design_values(c);
    conf_free(c);

    /* bad values: every one named, none of them printed */
    setenv("DSGATE_LISTEN", "secret-listen", 1);
    setenv("DSGATE_UPSTREAM", "ftp://user:secret@host", 1);
    setenv("DSGATE_REDIS_URL", "http://:secret@redis", 1);
    assert_null(conf_load(NULL, &err));
    assert_non_null(err);
    assert_int_equal(count_lines(err), 3);
    assert_non_null(strstr(err, "DSGATE_LISTEN: must be host:port"));
    assert_non_null(strstr(err, "DSGATE_UPSTREAM: must start with http:// or https://"));
    assert_non_null(strstr(err, "DSGATE_REDIS_URL: must be empty or a redis://"));
    assert_null(strstr(err, "secret"));
    free(err);

    /* an insecure first upstream may only be pointed at loopback */
    unset_env();
    c = parse("upstreams: [{name: a, url: \"https://127.0.0.1\", insecure: true}]\n", &err);
    assert_non_null(c);
    setenv("DSGATE_UPSTREAM", "https://remote.example", 1);
    assert_int_equal(conf_apply_env(c, &err), -1);
    assert_non_null(strstr(err, "DSGATE_UPSTREAM: upstreams[0].insecure is allowed only"));
    assert_string_equal(c->upstreams[0].url, "https://127.0.0.1");    /* unchanged */
    free(err);
    setenv("DSGATE_UPSTREAM", "https://localhost:9443", 1);
    assert_int_equal(conf_apply_env(c, &err), 0);
    assert_string_equal(c->upstreams[0].url, "https://localhost:9443");
    conf_free(c);
    unset_env();
}

/* A file given with -c gets the overrides too, and names itself in errors. */
static void test_env_with_file(void **state)
{
    char path[] = "/tmp/test_conf_XXXXXX";
    int fd = mkstemp(path);
    static const char bad[] = "listen: 127.0.0.1:1\nqueue: {max_wait: 0}\n";
    char *err = NULL, want[128];
    struct conf *c;
    FILE *f;

    (void)state;
    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    fputs(bad, f);
    fclose(f);
    unset_env();
    assert_null(conf_load(path, &err));
    snprintf(want, sizeof(want), "%s:2:9: queue.max_wait: must be between 1ms and 24h (got \"0\")",
             path);
    assert_string_equal(err, want);
    free(err);

    f = fopen(path, "w");
    fputs("listen: 127.0.0.1:1\n", f);
    fclose(f);
    setenv("DSGATE_LISTEN", "127.0.0.1:2", 1);
    c = conf_load(path, &err);
    assert_non_null(c);
    assert_string_equal(c->listen, "127.0.0.1:2");
    assert_string_equal(c->file, path);
    conf_free(c);
    unset_env();
    unlink(path);
}

/* upstreams[].dialects: as listed, else by the url's host. */
static void test_dialects(void **state)
{
    static const unsigned both = DIALECT_BIT(DIALECT_OPENAI) | DIALECT_BIT(DIALECT_ANTHROPIC);
    static const unsigned openai = DIALECT_BIT(DIALECT_OPENAI);
    static const char yaml[] =
        "upstreams:\n"
        "  - {name: a, url: \"https://api.deepseek.com\"}\n"
        "  - {name: b, url: \"HTTPS://API.DeepSeek.com:443/\"}\n"
        "  - {name: c, url: \"http://127.0.0.1:8000/v1\"}\n"
        "  - {name: d, url: \"https://deepseek.example\"}\n"
        "  - {name: e, url: \"http://127.0.0.1:8000\", dialects: [anthropic, openai]}\n"
        "  - {name: f, url: \"https://api.deepseek.com\", dialects: [openai]}\n"
        "  - {name: g, url: \"http://localhost:11434\", dialects: [Anthropic]}\n";
    static const unsigned want[] = {both, both, openai, openai, both, openai,
                                    DIALECT_BIT(DIALECT_ANTHROPIC)};
    char *err = NULL;
    struct conf *c;

    (void)state;
    unset_env();
    c = parse(yaml, &err);
    assert_null(err);
    assert_non_null(c);
    assert_int_equal(c->nupstreams, NELEM(want));
    for (size_t i = 0; i < NELEM(want); i++) {
        if (c->upstreams[i].dialects != want[i]) {
            fail_msg("upstream %s: dialects %#x, want %#x", c->upstreams[i].name,
                     c->upstreams[i].dialects, want[i]);
        }
    }
    conf_free(c);

    /* DSGATE_UPSTREAM: a default follows the new host, a listed set stays */
    setenv("DSGATE_UPSTREAM", "http://127.0.0.1:9999", 1);
    c = conf_load(NULL, &err);
    assert_non_null(c);
    assert_int_equal(c->upstreams[0].dialects, openai);
    conf_free(c);
    c = parse("upstreams: [{name: a, url: \"http://x\", dialects: [openai, anthropic]}]\n", &err);
    assert_non_null(c);
    assert_int_equal(conf_apply_env(c, &err), 0);
    assert_int_equal(c->upstreams[0].dialects, both);
    conf_free(c);
    setenv("DSGATE_UPSTREAM", "https://api.deepseek.com", 1);
    c = parse("upstreams: [{name: a, url: \"http://127.0.0.1:1\"}]\n", &err);
    assert_non_null(c);
    assert_int_equal(c->upstreams[0].dialects, openai);
    assert_int_equal(conf_apply_env(c, &err), 0);
    assert_int_equal(c->upstreams[0].dialects, both);
    conf_free(c);
    unset_env();
}

static void test_reload(void **state)
{
    char *err = NULL;
    struct conf *a = parse("listen: 127.0.0.1:1\nfleet: {redis: \"redis://h\"}\n", &err);
    struct conf *b = parse("listen: 127.0.0.1:1\nfleet: {redis: \"redis://h\"}\n"
                           "queue: {max_queued: 5}\nlog: {level: debug}\n", &err);
    struct conf *d = parse("listen: 127.0.0.1:2\nadmin_listen: 127.0.0.1:3\n", &err);

    (void)state;
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(d);
    assert_int_equal(conf_check_reload(a, b, &err), 0);
    assert_null(err);
    assert_int_equal(conf_check_reload(a, d, &err), -1);
    assert_string_equal(err,
                        "listen: cannot change on reload; restart dsgate to apply it\n"
                        "admin_listen: cannot change on reload; restart dsgate to apply it\n"
                        "fleet.redis: cannot change on reload; restart dsgate to apply it");
    free(err);
    conf_free(a);
    conf_free(b);
    conf_free(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_design_example),
        cmocka_unit_test(test_shipped_file),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_durations),
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_priorities),
        cmocka_unit_test(test_hostport),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_many_errors),
        cmocka_unit_test(test_too_many_errors),
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_bounds_inclusive),
        cmocka_unit_test(test_insecure),
        cmocka_unit_test(test_env),
        cmocka_unit_test(test_dialects),
        cmocka_unit_test(test_env_with_file),
        cmocka_unit_test(test_reload),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
