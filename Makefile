# dsgate: one GNU Makefile.
#
#   make          optimised build/dsgate
#   make deps     install Debian packages needed to build and test (no-op when present)
#   make run      deps + build + run in the foreground with conf/dsgate.yaml
#   make test     deps + ASan/UBSan build + unit, integration and client tests
#   make install  PREFIX=/usr/local DESTDIR=
#
# Quiet by default; V=1 shows every command.

PREFIX    ?= /usr/local
SYSCONFDIR ?= /etc
DESTDIR   ?=
VERSION   := 0.1.0

CC        ?= cc
PKGS      := libevent libcurl jansson hiredis yaml-0.1 openssl
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS  := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lhiredis -levent_core -lm

WARN      := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes
BASEFLAGS := -std=gnu11 -D_GNU_SOURCE $(WARN) -MMD -MP -DDSGATE_VERSION='"$(VERSION)"' \
             -DDSGATE_SYSCONF='"$(SYSCONFDIR)/dsgate/dsgate.yaml"' $(PKG_CFLAGS)
OPTFLAGS  ?= -O2 -g
SANFLAGS  := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

ifeq ($(V),1)
Q :=
else
Q := @
endif

SRCS      := $(wildcard src/*.c)
LIBSRCS   := $(filter-out src/main.c,$(SRCS))
OBJS      := $(SRCS:src/%.c=build/obj/%.o)
ASAN_OBJS := $(SRCS:src/%.c=build/asan/obj/%.o)
ASAN_LIBOBJS := $(LIBSRCS:src/%.c=build/asan/obj/%.o)
UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=build/asan/%)

# Debian packages: build libraries, then what the tests use.
DEB_BUILD := build-essential pkg-config libevent-dev libcurl4-openssl-dev libjansson-dev \
             libhiredis-dev libyaml-dev libssl-dev
DEB_TEST  := libcmocka-dev python3-yaml python3-httpx python3-h11 clang libclang-rt-14-dev
# command:package pairs; a command already on PATH (for example a Node.js
# from elsewhere) is used as it is
DEB_TOOLS := redis-server:redis-server python3:python3 curl:curl node:nodejs npm:npm \
             promtool:prometheus systemd-analyze:systemd openssl:openssl prlimit:util-linux

.PHONY: all deps run test unit integration clients install clean bench

all: build/dsgate

build/dsgate: $(OBJS)
	@echo "  LD      $@"
	$(Q)$(CC) $(OPTFLAGS) -o $@ $^ $(PKG_LIBS)

build/obj/%.o: src/%.c | build/obj
	@echo "  CC      $<"
	$(Q)$(CC) $(BASEFLAGS) $(OPTFLAGS) -c -o $@ $<

build/asan/dsgate: $(ASAN_OBJS)
	@echo "  LD      $@"
	$(Q)$(CC) $(SANFLAGS) -o $@ $^ $(PKG_LIBS)

build/asan/obj/%.o: src/%.c | build/asan/obj
	@echo "  CC      $< (asan)"
	$(Q)$(CC) $(BASEFLAGS) $(SANFLAGS) -c -o $@ $<

build/asan/test_%: tests/unit/test_%.c $(ASAN_LIBOBJS) | build/asan/obj
	@echo "  CC      $< (asan)"
	$(Q)$(CC) $(BASEFLAGS) $(SANFLAGS) -Isrc -o $@ $< $(ASAN_LIBOBJS) $(PKG_LIBS) -lcmocka

build/fake_upstream: tests/fake/fake_upstream.c | build/obj
	@echo "  CC      $<"
	$(Q)$(CC) $(BASEFLAGS) -O2 -g -o $@ $< $(PKG_LIBS)

build/obj build/asan/obj:
	$(Q)mkdir -p $@

# Installs only what is missing, so it is a no-op on a prepared machine.
deps:
	@missing=""; for p in $(DEB_BUILD) $(DEB_TEST); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	for t in $(DEB_TOOLS); do \
	    command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "  DEPS   $$missing"; \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

run: deps
	$(Q)$(MAKE) --no-print-directory build/dsgate
	./build/dsgate -c conf/dsgate.yaml

test: deps
	$(Q)$(MAKE) --no-print-directory build/dsgate build/asan/dsgate build/fake_upstream $(UNIT_BINS)
	$(Q)tests/run.sh

install: build/dsgate
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SYSCONFDIR)/dsgate $(DESTDIR)/lib/systemd/system \
	    $(DESTDIR)$(PREFIX)/share/doc/dsgate
	install -m 0755 build/dsgate $(DESTDIR)$(PREFIX)/bin/dsgate
	install -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/dsgate/README.md
	[ -e $(DESTDIR)$(SYSCONFDIR)/dsgate/dsgate.yaml ] || install -m 0644 conf/dsgate.yaml $(DESTDIR)$(SYSCONFDIR)/dsgate/dsgate.yaml
	sed 's|@BINDIR@|$(PREFIX)/bin|g; s|@SYSCONF@|$(SYSCONFDIR)|g; s|@DOCDIR@|$(PREFIX)/share/doc/dsgate|g' \
	    systemd/dsgate.service > $(DESTDIR)/lib/systemd/system/dsgate.service
	chmod 0644 $(DESTDIR)/lib/systemd/system/dsgate.service

clean:
	rm -rf build

include tests/fuzz/fuzz.mk

-include $(OBJS:.o=.d) $(ASAN_OBJS:.o=.d)
