/*
 * log: diagnostics and the access log, one line per record.
 *
 * JSON lines ({"time":..,"level":..,"msg":..}) or plain text, to stderr or a
 * file that SIGUSR1 reopens.  Callers never pass keys, tokens or prompts.
 */
#ifndef DSGATE_LOG_H
#define DSGATE_LOG_H

#include <stdbool.h>
#include <stddef.h>

#include "conf.h"

/* FILE "" or NULL: stderr.  0 or -1 (the previous target stays). */
int log_open(enum log_level level, enum log_format format, const char *file);
/* Reopen the file after rotation (SIGUSR1); 0 or -1. */
int log_reopen(void);
bool log_enabled(enum log_level level);
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Write one complete access-log record; LINE is a JSON object without newline. */
void log_access(const char *line, size_t len);
/* Append S to B escaped as the inside of a JSON string. */
struct evbuffer;
void log_json_escape(struct evbuffer *b, const char *s);
void log_close(void);

#endif
