/*
 * models: GET /v1/models answered from every upstream's list and the
 * model aliases, fetched without blocking and cached briefly.
 */
#ifndef DSGATE_MODELS_H
#define DSGATE_MODELS_H

#include <stdbool.h>

struct gateway;
struct http_req;

bool models_wanted(const struct gateway *gw, const struct http_req *req);
void models_handle(struct gateway *gw, struct http_req *req);
void models_free(void);

#endif
