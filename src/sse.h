/*
 * sse: just enough of Server-Sent Events framing to tell data from noise.
 *
 * An upstream that is busy keeps a connection alive with SSE comments
 * (": keep-alive") and blank lines, or, for non-stream answers, with leading
 * whitespace.  Those are not data: they do not stop the first-data timer,
 * and a retry is still transparent after them.  The scanner is fed the body
 * in pieces and tells where the first data byte is.
 */
#ifndef DSGATE_SSE_H
#define DSGATE_SSE_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

struct sse_scan {
    bool sse; /* text/event-stream; else a plain body */
    int state;
    bool line_has_data; /* the current line is a field line */
    bool seen_data;
    bool mid_line;  /* the last byte fed did not end a line */
    bool mid_event; /* a field line was seen since the last blank line */
};

void sse_scan_init(struct sse_scan *s, bool sse);
/*
 * Feed N bytes.  Returns true when they contain data: for SSE a byte of a
 * field line (not a comment, not a blank line); for a plain body any byte
 * that is not white space.
 */
bool sse_scan_feed(struct sse_scan *s, const char *p, size_t n);

#endif
