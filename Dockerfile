# dsgate container image: build stage runs the same make targets as a
# developer; the runtime stage has only the shared libraries the binary
# links (checked by tests/ops/test_packaging.sh against ldd).
FROM debian:12-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config \
      libevent-dev libcurl4-openssl-dev libjansson-dev libhiredis-dev libyaml-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make clean && make build/dsgate

FROM debian:12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
      libevent-2.1-7 libcurl4 libjansson4 libhiredis0.14 libyaml-0-2 libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --no-create-home --uid 10001 dsgate
COPY --from=build /src/build/dsgate /usr/local/bin/dsgate
COPY conf/dsgate.yaml /etc/dsgate/dsgate.yaml
USER 10001
# In a container the gateway must listen beyond loopback; override with
# DSGATE_LISTEN or a mounted /etc/dsgate/dsgate.yaml.
ENV DSGATE_LISTEN=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/dsgate", "--health", "http://127.0.0.1:8080/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/dsgate"]
CMD ["-c", "/etc/dsgate/dsgate.yaml"]
