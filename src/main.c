/*
 * main: command line, start-up, signals, the event loop, drain and exit.
 *
 *   dsgate [-c FILE] [--check-config] [--health URL] [--version] [--help]
 *
 * Signals arrive as libevent events; nothing runs in a real signal handler.
 * SIGTERM/SIGINT: stop accepting, close idle connections, let queued and
 * in-flight requests finish until shutdown_timeout, exit 0; a second one
 * exits at once (what is left gets a 503 or a closed stream).  SIGHUP:
 * reload; an invalid file keeps the running configuration.  SIGUSR1:
 * reopen the log file.  Under systemd, READY/RELOADING/STOPPING are
 * reported on $NOTIFY_SOCKET.
 */
#include <errno.h>
#include <getopt.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>

#include "conf.h"
#include "dispatch.h"
#include "gateway.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "models.h"
#include "request.h"
#include "server.h"
#include "upstream.h"

#ifndef DSGATE_VERSION
#define DSGATE_VERSION "0.0.0"
#endif
#ifndef DSGATE_SYSCONF
#define DSGATE_SYSCONF "/etc/dsgate/dsgate.yaml"
#endif

#define DRAIN_POLL_MS 50

static struct gateway gw;
static struct http_server *admin_srv;
static struct event *drain_timer;
static int64_t drain_deadline_us;
static bool stopping;
static const char *conf_file;

static void
usage(FILE *f)
{
    fprintf(f,
            "usage: dsgate [-c FILE] [--check-config] [--health URL] [--version] [--help]\n"
            "\n"
            "  -c, --config FILE   configuration file (default: %s;\n"
            "                      built-in defaults when it does not exist)\n"
            "  -t, --check-config  validate the configuration and exit 0 or 1\n"
            "      --health URL    GET URL (http://127.0.0.1:PORT/healthz), exit 0 on 200;\n"
            "                      a health check for containers that needs no other tool\n"
            "  -v, --version       print the version and exit\n"
            "  -h, --help          this text\n"
            "\n"
            "Signals: SIGHUP reloads the configuration, SIGTERM/SIGINT drain and exit,\n"
            "SIGUSR1 reopens the log file.\n"
            "Environment: DSGATE_LISTEN, DSGATE_UPSTREAM, DSGATE_REDIS_URL override the\n"
            "file; the upstream key is read from the variable named by api_key_env.\n",
            DSGATE_SYSCONF);
}

/*
 * systemd's readiness protocol: one datagram to $NOTIFY_SOCKET.  Without
 * the variable (not under systemd) it does nothing.
 */
static void
notify(const char *state)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa;

    if (!path || !*path || strlen(path) >= sizeof(sa.sun_path)) {
        return;
    }
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, path, strlen(path));
    if (sa.sun_path[0] == '@') {
        sa.sun_path[0] = '\0'; /* abstract namespace */
    }
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path));
    ssize_t n = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa, len);
    (void)n;
    close(fd);
}

/* Each line of a multi-line error text as its own log record. */
static void
log_lines(enum log_level level, const char *prefix, const char *text)
{
    for (const char *p = text; p && *p;) {
        size_t n = strcspn(p, "\n");
        if (n > 0) {
            log_msg(level, "%s%.*s", prefix, (int)n, p);
        }
        p += n + (p[n] == '\n');
    }
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
    struct timeval tv = {0, DRAIN_POLL_MS * 1000};
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
    notify("STOPPING=1");
    log_msg(LOG_INFO, "%s: draining (%zu requests in flight, up to %lld ms)", strsignal((int)sig),
            gw.live_requests, (long long)gw.conf->shutdown_timeout_ms);
    http_server_stop_accepting(gw.srv);
    http_server_close_idle(gw.srv);
    if (admin_srv) {
        http_server_stop_accepting(admin_srv);
        http_server_close_idle(admin_srv);
    }
    drain_deadline_us = http_now_us() + gw.conf->shutdown_timeout_ms * 1000;
    drain_check_cb(-1, 0, NULL);
}

static void
signal_hup_cb(evutil_socket_t sig, short what, void *arg)
{
    char *err = NULL;

    (void)sig;
    (void)what;
    (void)arg;
    if (stopping) {
        return;
    }
    notify("RELOADING=1");
    struct conf *c = conf_load(conf_file, &err);
    if (!c) {
        log_msg(LOG_WARN, "reload: %s is invalid; keeping the running configuration",
                conf_file ? conf_file : "(built-in)");
        log_lines(LOG_WARN, "reload: ", err);
        free(err);
        notify("READY=1");
        return;
    }
    free(err);
    err = NULL;
    if (conf_check_reload(gw.conf, c, &err) < 0) {
        log_msg(LOG_WARN, "reload refused; keeping the running configuration");
        log_lines(LOG_WARN, "reload: ", err);
        free(err);
        conf_free(c);
        notify("READY=1");
        return;
    }
    if (log_open(c->log.level, c->log.format, c->log.file) < 0) {
        log_msg(LOG_WARN, "reload: cannot open log.file; keeping the old log target");
    }
    if (gateway_apply(&gw, c) < 0) {
        log_msg(LOG_ERROR, "reload: cannot apply the configuration");
    } else {
        log_msg(LOG_INFO, "reloaded %s: %zu upstream(s)", conf_file ? conf_file : "(built-in)",
                gw.nups);
    }
    dispatch_pump(&gw); /* new limits may let queued requests go */
    notify("READY=1");
}

static void
signal_usr1_cb(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    (void)arg;
    log_reopen();
}

/*
 * --health URL: a blocking GET for container health checks (runs in its
 * own short-lived process, never inside the daemon).
 */
static int
health_check(const char *url)
{
    CURL *e = curl_easy_init();
    long status = 0;

    if (!e) {
        return 1;
    }
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 3000L);
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_NOBODY, 0L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, fwrite);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, stdout);
    CURLcode rc = curl_easy_perform(e);
    if (rc == CURLE_OK) {
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
    } else {
        fprintf(stderr, "dsgate --health: %s\n", curl_easy_strerror(rc));
    }
    curl_easy_cleanup(e);
    return status == 200 ? 0 : 1;
}

int
main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'}, {"check-config", no_argument, NULL, 't'},
        {"health", required_argument, NULL, 'H'}, {"version", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    const char *file = NULL, *health = NULL;
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
        case 'H':
            health = optarg;
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
    if (health) {
        curl_global_init(CURL_GLOBAL_DEFAULT);
        int rc = health_check(health);
        curl_global_cleanup();
        return rc;
    }
    if (!file && access(DSGATE_SYSCONF, F_OK) == 0) {
        file = DSGATE_SYSCONF;
    }
    conf_file = file;

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
    gw.base = event_base_new();
    if (!gw.base) {
        log_msg(LOG_ERROR, "event_base_new failed");
        return 1;
    }
    gw.up = upstream_ctx_new(gw.base);
    if (!gw.up || request_setup(&gw) < 0 || gateway_apply(&gw, c) < 0) {
        log_msg(LOG_ERROR, "cannot set up the gateway");
        return 1;
    }
    struct http_limits lim;
    gateway_limits(gw.conf, &lim);
    gw.srv = http_server_new(gw.base, gw.conf->listen, &lim, server_handle, &gw);
    if (!gw.srv) {
        return 1;
    }
    http_server_set_reject_hook(gw.srv, server_on_http_reject, &gw);
    http_server_set_error_body(gw.srv, server_error_body);
    if (gw.conf->admin_listen[0]) {
        admin_srv = http_server_new(gw.base, gw.conf->admin_listen, &lim, server_handle_admin, &gw);
        if (!admin_srv) {
            return 1;
        }
    }
    struct event *ev_term = evsignal_new(gw.base, SIGTERM, signal_stop_cb, NULL);
    struct event *ev_int = evsignal_new(gw.base, SIGINT, signal_stop_cb, NULL);
    struct event *ev_hup = evsignal_new(gw.base, SIGHUP, signal_hup_cb, NULL);
    struct event *ev_usr1 = evsignal_new(gw.base, SIGUSR1, signal_usr1_cb, NULL);
    drain_timer = evtimer_new(gw.base, drain_check_cb, NULL);
    evsignal_add(ev_term, NULL);
    evsignal_add(ev_int, NULL);
    evsignal_add(ev_hup, NULL);
    evsignal_add(ev_usr1, NULL);

    log_msg(LOG_INFO, "dsgate %s listening on %s%s%s, config %s, %zu upstream(s), first %s",
            DSGATE_VERSION, http_server_addr(gw.srv), admin_srv ? ", admin on " : "",
            admin_srv ? http_server_addr(admin_srv) : "", file ? file : "(built-in defaults)",
            gw.nups, gw.conf->upstreams[0].url);
    notify("READY=1");

    event_base_dispatch(gw.base);

    request_shutdown(&gw); /* queued and in-flight requests get their answer */
    http_server_free(gw.srv);
    http_server_free(admin_srv);
    upstream_ctx_free(gw.up);
    request_teardown(&gw);
    gateway_free(&gw);
    event_free(ev_term);
    event_free(ev_int);
    event_free(ev_hup);
    event_free(ev_usr1);
    event_free(drain_timer);
    event_base_free(gw.base);
    models_free();
    metrics_free();
    curl_global_cleanup();
    log_close();
    return 0;
}
