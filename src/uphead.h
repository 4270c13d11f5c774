/*
 * uphead: checks on an upstream's response head, which is untrusted input.
 *
 * An upstream's header lines are forwarded to clients, so a byte that
 * would be read differently by the client (a bare CR, a NUL, a folded
 * line, a name that is not a token) makes the whole answer invalid rather
 * than being passed on or guessed at.  The framing of the client's reply
 * is dsgate's own: the upstream's Content-Length is used only when it is
 * the answer's sole framing and one plain number.
 */
#ifndef DSGATE_UPHEAD_H
#define DSGATE_UPHEAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct http_header;

enum uphead_kind {
    UPHEAD_FIELD, /* a valid "name: value" line */
    UPHEAD_END,   /* the empty line that ends the head */
    UPHEAD_BAD,   /* invalid: the answer must not be used */
};

struct uphead_field {
    const char *name; /* into the line; NAME_LEN bytes, not terminated */
    size_t name_len;
    const char *value; /* without surrounding white space; VALUE_LEN bytes */
    size_t value_len;
};

/*
 * Check one header line as libcurl hands it to the header callback (its
 * line end included, LEN bytes, not terminated; not the status line).
 * UPHEAD_BAD sets *WHY to a static reason.
 */
enum uphead_kind uphead_line(const char *p, size_t len, struct uphead_field *f, const char **why);

/*
 * Is the status line LEN bytes at P well-formed ("HTTP/1.x NNN reason",
 * CRLF; "HTTP/2 NNN" when the transfer is HTTP/2: libcurl's own line)?
 */
bool uphead_status_line(const char *p, size_t len, bool h2);
/*
 * The complete head's framing: at most one Transfer-Encoding, exactly
 * "chunked"; Content-Length plain digits, the same number if repeated.
 * Anything else is an invalid answer (RFC 9112 6.3: a proxy answers 502).
 * *CHUNKED: the body is chunked (decoded with uphead_chunks).
 */
bool uphead_framing_ok(const struct http_header *h, size_t n, bool *chunked, const char **why);
/* The reply's Content-Length from the upstream's headers, or -1: send it chunked. */
int64_t uphead_length(const struct http_header *h, size_t n);

/* Does a Content-Encoding other than identity apply to the body? */
bool uphead_encoded(const struct http_header *h, size_t n);

/*
 * A chunked body, decoded by dsgate itself (RFC 9112 7.1), strictly: hex
 * digits then CRLF or ";ext" CRLF, data, CRLF; trailers "name:value" CRLF;
 * the final CRLF.  libcurl's own decoder is lenient (junk after a size, a
 * bare LF or CR) and dsgate would only see its result.
 */
struct uphead_chunks {
    int state;
    uint64_t left;
    unsigned ndig;
    bool colon;
};

void uphead_chunks_init(struct uphead_chunks *c);
/*
 * Decode LEN raw bytes into OUT (room for LEN bytes): the number of data
 * bytes written, or -1 when the framing is invalid (then *WHY says why).
 */
long uphead_chunks_feed(struct uphead_chunks *c, const char *raw, size_t len, char *out,
                        const char **why);
/* Did the body end (last chunk, trailers, final CRLF)? */
bool uphead_chunks_done(const struct uphead_chunks *c);

#endif
