/*
 * sse: data detection in SSE streams and plain bodies (see sse.h).
 */
#include "sse.h"

enum { SSE_LINE_START, SSE_COMMENT, SSE_FIELD, SSE_CR };

void
sse_scan_init(struct sse_scan *s, bool sse)
{
    s->sse = sse;
    s->state = SSE_LINE_START;
    s->line_has_data = false;
    s->seen_data = false;
    s->mid_line = false;
    s->mid_event = false;
}

bool
sse_scan_feed(struct sse_scan *s, const char *p, size_t n)
{
    bool data = false;

    if (!s->sse) {
        for (size_t i = 0; i < n; i++) {
            char ch = p[i];
            if (ch != ' ' && ch != '\t' && ch != '\r' && ch != '\n') {
                data = true;
                break;
            }
        }
        if (data) {
            s->seen_data = true;
        }
        return data;
    }
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (s->state == SSE_CR) {
            s->state = SSE_LINE_START;
            if (ch == '\n') {
                continue; /* CRLF */
            }
        }
        if (ch == '\r' || ch == '\n') {
            if (s->state == SSE_LINE_START) {
                s->mid_event = false; /* blank line: end of event */
            }
            s->state = ch == '\r' ? SSE_CR : SSE_LINE_START;
            continue;
        }
        if (s->state == SSE_LINE_START) {
            if (ch == ':') {
                s->state = SSE_COMMENT;
            } else {
                s->state = SSE_FIELD;
                s->mid_event = true;
                data = true;
            }
        }
    }
    s->mid_line = s->state == SSE_COMMENT || s->state == SSE_FIELD;
    if (data) {
        s->seen_data = true;
    }
    return data;
}
