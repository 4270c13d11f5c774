/*
 * log: diagnostics and the access log (see log.h).
 *
 * Lines are assembled in memory and written with one write(2) so that
 * records from one process never interleave.  The timestamp is UTC with
 * milliseconds.
 */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>

static enum log_level cur_level = LOG_INFO;
static enum log_format cur_format = LOG_FORMAT_JSON;
static int log_fd = 2;
static char log_path[4096];

static const char *level_names[] = {"error", "warn", "info", "debug"};

int
log_open(enum log_level level, enum log_format format, const char *file)
{
    cur_level = level;
    cur_format = format;
    if (!file || !*file) {
        if (log_fd > 2) {
            close(log_fd);
        }
        log_fd = 2;
        log_path[0] = '\0';
        return 0;
    }
    if (strcmp(file, log_path) == 0 && log_fd > 2) {
        return 0;
    }
    int fd = open(file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0) {
        log_msg(LOG_ERROR, "log file %s: %s", file, strerror(errno));
        return -1;
    }
    if (log_fd > 2) {
        close(log_fd);
    }
    log_fd = fd;
    snprintf(log_path, sizeof(log_path), "%s", file);
    return 0;
}

int
log_reopen(void)
{
    if (!log_path[0]) {
        return 0;
    }
    int fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0) {
        log_msg(LOG_ERROR, "reopen log file %s: %s", log_path, strerror(errno));
        return -1;
    }
    dup2(fd, log_fd);
    close(fd);
    return 0;
}

void
log_close(void)
{
    if (log_fd > 2) {
        close(log_fd);
        log_fd = 2;
    }
    log_path[0] = '\0';
}

bool
log_enabled(enum log_level level)
{
    return level <= cur_level;
}

static void
write_all(const char *p, size_t len)
{
    while (len > 0) {
        ssize_t n = write(log_fd, p, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return;
        }
        p += n;
        len -= (size_t)n;
    }
}

static size_t
timestamp(char *buf, size_t len)
{
    struct timeval tv;
    struct tm tm;

    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
    n += (size_t)snprintf(buf + n, len - n, ".%03dZ", (int)(tv.tv_usec / 1000));
    return n;
}

void
log_json_escape(struct evbuffer *b, const char *s)
{
    const char *run = s;

    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch != '"' && ch != '\\' && ch >= 0x20) {
            continue;
        }
        evbuffer_add(b, run, (size_t)(s - run));
        char e[8];
        if (ch == '"' || ch == '\\') {
            e[0] = '\\';
            e[1] = (char)ch;
            evbuffer_add(b, e, 2);
        } else {
            snprintf(e, sizeof(e), "\\u%04x", ch);
            evbuffer_add(b, e, 6);
        }
        run = s + 1;
    }
    evbuffer_add(b, run, (size_t)(s - run));
}

void
log_msg(enum log_level level, const char *fmt, ...)
{
    char msg[2048], ts[40];
    va_list ap;

    if (!log_enabled(level)) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    timestamp(ts, sizeof(ts));

    struct evbuffer *b = evbuffer_new();
    if (!b) {
        return;
    }
    if (cur_format == LOG_FORMAT_JSON) {
        evbuffer_add_printf(b, "{\"time\":\"%s\",\"level\":\"%s\",\"msg\":\"", ts,
                            level_names[level]);
        log_json_escape(b, msg);
        evbuffer_add(b, "\"}\n", 3);
    } else {
        evbuffer_add_printf(b, "%s %s %s\n", ts, level_names[level], msg);
    }
    size_t len = evbuffer_get_length(b);
    write_all((const char *)evbuffer_pullup(b, -1), len);
    evbuffer_free(b);
}

void
log_access(const char *line, size_t len)
{
    char ts[40], buf[4096];
    size_t tl = timestamp(ts, sizeof(ts));

    if (!log_enabled(LOG_INFO)) {
        return;
    }
    /* {"time":"...","type":"access", + the record's fields after its '{' */
    if (len > 0 && line[0] == '{' && tl + len + 40 < sizeof(buf)) {
        int n = snprintf(buf, sizeof(buf), "{\"time\":\"%s\",\"type\":\"access\",", ts);
        memcpy(buf + n, line + 1, len - 1);
        buf[(size_t)n + len - 1] = '\n';
        write_all(buf, (size_t)n + len);
    } else {
        write_all(line, len);
        write_all("\n", 1);
    }
}
