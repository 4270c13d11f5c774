/*
 * fuzz_conf: the configuration loader (conf_parse) on arbitrary YAML.
 *
 * Checks the contract of conf.h: a result and an error list never come
 * together, and a failure always says why.  A configuration that parses is
 * also run through conf_check_reload against the built-in defaults and
 * itself (a reload to the same file is always allowed).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "conf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *err = NULL;
    struct conf *c = conf_parse("fuzz.yaml", (const char *)data, size, &err);

    if (c && err) {
        fprintf(stderr, "conf_parse returned a conf and errors: %s\n", err);
        abort();
    }
    if (!c && !err) {
        fprintf(stderr, "conf_parse failed without saying why\n");
        abort();
    }
    free(err);
    if (c) {
        struct conf *d = conf_defaults();
        char *rerr = NULL;
        if (d) {
            (void)conf_check_reload(d, c, &rerr);
            free(rerr);
            rerr = NULL;
            conf_free(d);
        }
        if (conf_check_reload(c, c, &rerr) != 0) {
            fprintf(stderr, "a reload to the same configuration is refused: %s\n",
                    rerr ? rerr : "(no message)");
            abort();
        }
        free(rerr);
        conf_free(c);
    }
    return 0;
}
