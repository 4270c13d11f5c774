/*
 * main: command line, start-up, signals, the event loop, drain and exit.
 *
 *   dsgate [-c FILE] [--check-config] [--version] [--help]
 *
 * Signals arrive as libevent events; nothing runs in a real signal handler.
 * SIGTERM/SIGINT: stop accepting, close idle connections, let requests in
 * flight finish until shutdown_timeout, exit 0; a second one exits at once.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>

#include "conf.h"
#include "gateway.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "upstream.h"

#ifndef DSGATE_VERSION
#define DSGATE_VERSION "0.0.0"
#endif
#ifndef DSGATE_SYSCONF
#define DSGATE_SYSCONF "/etc/dsgate/dsgate.yaml"
#endif

#define DRAIN_POLL_MS 50

static struct gateway gw;
static struct event *drain_timer;
static int64_t drain_deadline_us;
static bool stopping;

static void
usage(FILE *f)
{
    fprintf(f,
            "usage: dsgate [-c FILE] [--check-config] [--version] [--help]\n"
            "\n"
            "  -c, --config FILE   configuration file (default: %s;\n"
            "                      built-in defaults when it does not exist)\n"
            "  -t, --check-config  validate the configuration and exit 0 or 1\n"
            "  -v, --version       print the version and exit\n"
            "  -h, --help          this text\n"
            "\n"
            "Environment: DSGATE_LISTEN, DSGATE_UPSTREAM, DSGATE_REDIS_URL override the\n"
            "file; the upstream key is read from the variable named by api_key_env.\n",
            DSGATE_SYSCONF);
}

static void
limits_from_conf(const struct conf *c, struct http_limits *l)
{
    l->max_body = (size_t)c->limits.max_body;
    l->max_headers = (size_t)c->limits.max_headers;
    l->max_connections = c->limits.max_connections;
    l->header_timeout_ms = c->limits.header_timeout_ms;
    l->body_timeout_ms = c->limits.body_timeout_ms;
    l->idle_timeout_ms = c->limits.idle_timeout_ms;
}

static void
drain_check_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (gw.live_requests == 0 && http_server_nconns(gw.srv) == 0) {
        log_msg(LOG_INFO, "drained; exiting");
        event_base_loopbreak(gw.base);
        return;
    }
    if (http_now_us() >= drain_deadline_us) {
        log_msg(LOG_WARN, "shutdown_timeout reached with %zu requests in flight; exiting",
                gw.live_requests);
        event_base_loopbreak(gw.base);
        return;
    }
    struct timeval tv = { 0, DRAIN_POLL_MS * 1000 };
    evtimer_add(drain_timer, &tv);
}

static void
signal_stop_cb(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    (void)arg;
    if (stopping) {
        log_msg(LOG_WARN, "second %s: exiting now", strsignal((int)sig));
        event_base_loopbreak(gw.base);
        return;
    }
    stopping = true;
    gw.draining = true;
    log_msg(LOG_INFO, "%s: draining (%zu requests in flight, up to %lld ms)",
            strsignal((int)sig), gw.live_requests, (long long)gw.conf->shutdown_timeout_ms);
    http_server_stop_accepting(gw.srv);
    http_server_close_idle(gw.srv);
    drain_deadline_us = http_now_us() + gw.conf->shutdown_timeout_ms * 1000;
    drain_check_cb(-1, 0, NULL);
}

static void
signal_usr1_cb(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    (void)arg;
    log_reopen();
}

int
main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "config", required_argument, NULL, 'c' },
        { "check-config", no_argument, NULL, 't' },
        { "version", no_argument, NULL, 'v' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *file = NULL;
    bool check = false;
    int ch;

    while ((ch = getopt_long(argc, argv, "c:tvh", opts, NULL)) != -1) {
        switch (ch) {
        case 'c':
            file = optarg;
            break;
        case 't':
            check = true;
            break;
        case 'v':
            printf("dsgate %s\n", DSGATE_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        usage(stderr);
        return 2;
    }
    if (!file && access(DSGATE_SYSCONF, F_OK) == 0) {
        file = DSGATE_SYSCONF;
    }

    char *err = NULL;
    struct conf *c = conf_load(file, &err);
    if (!c) {
        fprintf(stderr, "%s", err ? err : "configuration error\n");
        if (err && err[0] && err[strlen(err) - 1] != '\n') {
            fputc('\n', stderr);
        }
        free(err);
        if (check) {
            fprintf(stderr, "dsgate: configuration %s is invalid\n", file ? file : "(built-in)");
        }
        return 1;
    }
    free(err);
    if (check) {
        printf("dsgate: configuration %s is valid\n", file ? file : "(built-in defaults)");
        conf_free(c);
        return 0;
    }

    signal(SIGPIPE, SIG_IGN);
    if (log_open(c->log.level, c->log.format, c->log.file) < 0) {
        conf_free(c);
        return 1;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
        log_msg(LOG_ERROR, "curl_global_init failed");
        conf_free(c);
        return 1;
    }

    metrics_init();
    gw.conf = c;
    gw.base = event_base_new();
    if (!gw.base) {
        log_msg(LOG_ERROR, "event_base_new failed");
        return 1;
    }
    gw.up = upstream_ctx_new(gw.base);
    if (!gw.up || gateway_setup_upstreams(&gw) < 0 || request_cache_setup(&gw) < 0) {
        log_msg(LOG_ERROR, "cannot set up upstreams");
        return 1;
    }
    struct http_limits lim;
    limits_from_conf(c, &lim);
    gw.srv = http_server_new(gw.base, c->listen, &lim, server_handle, &gw);
    if (!gw.srv) {
        return 1;
    }
    struct event *ev_term = evsignal_new(gw.base, SIGTERM, signal_stop_cb, NULL);
    struct event *ev_int = evsignal_new(gw.base, SIGINT, signal_stop_cb, NULL);
    struct event *ev_usr1 = evsignal_new(gw.base, SIGUSR1, signal_usr1_cb, NULL);
    drain_timer = evtimer_new(gw.base, drain_check_cb, NULL);
    evsignal_add(ev_term, NULL);
    evsignal_add(ev_int, NULL);
    evsignal_add(ev_usr1, NULL);

    log_msg(LOG_INFO, "dsgate %s listening on %s, config %s, %zu upstream(s), first %s",
            DSGATE_VERSION, http_server_addr(gw.srv), file ? file : "(built-in defaults)",
            c->nupstreams, c->upstreams[0].url);

    event_base_dispatch(gw.base);

    http_server_free(gw.srv);
    request_cache_free(&gw);
    upstream_ctx_free(gw.up);
    gateway_free_upstreams(&gw);
    event_free(ev_term);
    event_free(ev_int);
    event_free(ev_usr1);
    event_free(drain_timer);
    event_base_free(gw.base);
    conf_free(gw.conf);
    models_free();
    metrics_free();
    curl_global_cleanup();
    log_close();
    return 0;
}
