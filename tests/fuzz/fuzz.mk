# tests/fuzz/fuzz.mk: libFuzzer targets for dsgate (included by the Makefile).
#
#   make fuzz                 build, then run each target for $(FUZZ_SECONDS) s
#   make fuzz FUZZ_SECONDS=600 FUZZ_TARGETS="http conf"
#   make fuzz-replay          run each target once over its committed corpus:
#                             one PASS/FAIL line per target, then
#                             `RESULT passed=N failed=N` (for tests/run.sh)
#   make fuzz-build           only build build/fuzz/fuzz_<target>
#   FUZZ_BUILD=DIR            put everything (objects, binaries, corpus, logs) in DIR
#
# Needs clang and libclang-rt-14-dev (libFuzzer and the sanitizer runtimes).
# Sources under src/ are compiled again with clang into build/fuzz/obj/
# (-fsanitize=fuzzer-no-link,address,undefined); each target links only the
# modules it needs.  `fuzz` writes what it finds to build/fuzz/corpus/<t>/
# (the committed seeds in tests/fuzz/corpus/<t>/ are only read), crash
# reproducers to build/fuzz/artifacts/, its logs to build/fuzz/logs/, and
# prints per target the executions and libFuzzer's last cov:/ft: figures.
# A reproducer worth keeping goes into tests/fuzz/corpus/<t>/ by hand, so
# that fuzz-replay guards against the bug from then on.

# Keep the including Makefile's default goal (`all`) wherever this is included.
fuzz_saved_goal := $(.DEFAULT_GOAL)

FUZZ_CC       ?= clang
FUZZ_SECONDS  ?= 60
FUZZ_TARGETS  ?= conf cache_key sse retry_after entry http rewrite jscan uphead compat
FUZZ_DIR      := tests/fuzz
FUZZ_BUILD    ?= build/fuzz
FUZZ_PKGS     := libevent jansson yaml-0.1 openssl
FUZZ_PKG_CFLAGS := $(shell pkg-config --cflags $(FUZZ_PKGS) 2>/dev/null)
FUZZ_PKG_LIBS := $(shell pkg-config --libs $(FUZZ_PKGS) 2>/dev/null) -lm
FUZZ_SAN      := -fsanitize=address,undefined -fno-sanitize-recover=undefined
# -iquote, not -I: src/sched.h must not shadow <sched.h>
FUZZ_CFLAGS   := -std=gnu11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer -Wall -Wextra \
                 -Wno-unused-parameter -DDSGATE_VERSION='"fuzz"' \
                 -DDSGATE_SYSCONF='"/nonexistent/dsgate.yaml"' -iquote src $(FUZZ_PKG_CFLAGS)

# What each target links from src/ (module names) and its -max_len.
FUZZ_MODS_conf        := conf route dialect log
FUZZ_MODS_cache_key   := cache dialect log
FUZZ_MODS_sse         := sse
FUZZ_MODS_retry_after := retry
FUZZ_MODS_entry       := cache dialect log
FUZZ_MODS_http        := http log
FUZZ_MODS_rewrite     := route
FUZZ_MODS_jscan       := jscan
FUZZ_MODS_uphead      := uphead
FUZZ_MODS_compat      := compat jscan cache dialect log metrics
FUZZ_LEN_conf         := 8192
FUZZ_LEN_cache_key    := 8192
FUZZ_LEN_sse          := 4096
FUZZ_LEN_retry_after  := 256
FUZZ_LEN_entry        := 4096
FUZZ_LEN_http         := 20000
FUZZ_LEN_rewrite      := 4096
FUZZ_LEN_jscan        := 8192
FUZZ_LEN_uphead       := 8192
FUZZ_LEN_compat       := 8192
# Dictionaries (tests/fuzz/dict/<name>.dict), where one helps.
FUZZ_DICT_conf        := conf
FUZZ_DICT_cache_key   := json
FUZZ_DICT_sse         := sse
FUZZ_DICT_retry_after := retry_after
FUZZ_DICT_http        := http
FUZZ_DICT_rewrite     := json
FUZZ_DICT_jscan       := json
FUZZ_DICT_uphead      := uphead
FUZZ_DICT_compat      := json

FUZZ_BINS := $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/fuzz_%)

ifeq ($(V),1)
FQ :=
else
FQ := @
endif

.PHONY: fuzz fuzz-build fuzz-replay fuzz-check-clang

fuzz-check-clang:
	@command -v $(FUZZ_CC) >/dev/null 2>&1 || { \
	    echo "fuzz: $(FUZZ_CC) not found (apt-get install clang libclang-rt-14-dev)"; exit 1; }

$(FUZZ_BUILD)/obj/%.o: src/%.c | $(FUZZ_BUILD)/obj fuzz-check-clang
	@echo "  CC      $< (fuzz)"
	$(FQ)$(FUZZ_CC) $(FUZZ_CFLAGS) -MMD -MP -fsanitize=fuzzer-no-link $(FUZZ_SAN) -c -o $@ $<

$(FUZZ_BUILD)/obj:
	$(FQ)mkdir -p $@

# build/fuzz/fuzz_<t>: tests/fuzz/fuzz_<t>.c + its modules
define FUZZ_LINK
$(FUZZ_BUILD)/fuzz_$(1): $(FUZZ_DIR)/fuzz_$(1).c $(FUZZ_MODS_$(1):%=$(FUZZ_BUILD)/obj/%.o) | fuzz-check-clang
	@echo "  LD      $$@ (fuzz)"
	$(FQ)$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $(FUZZ_SAN) -o $$@ $$^ $(FUZZ_PKG_LIBS)
endef
$(foreach t,$(FUZZ_TARGETS),$(eval $(call FUZZ_LINK,$(t))))

fuzz-build: $(FUZZ_BINS)

# Each target for FUZZ_SECONDS; a summary line each; fails if any crashed.
fuzz: fuzz-build
	@mkdir -p $(FUZZ_BUILD)/logs $(FUZZ_BUILD)/artifacts
	@failed=0; for t in $(FUZZ_TARGETS); do \
	    mkdir -p $(FUZZ_BUILD)/corpus/$$t; \
	    log=$(FUZZ_BUILD)/logs/$$t.log; \
	    case $$t in \
	        conf) len=$(FUZZ_LEN_conf); dict=$(FUZZ_DICT_conf) ;; \
	        cache_key) len=$(FUZZ_LEN_cache_key); dict=$(FUZZ_DICT_cache_key) ;; \
	        sse) len=$(FUZZ_LEN_sse); dict=$(FUZZ_DICT_sse) ;; \
	        retry_after) len=$(FUZZ_LEN_retry_after); dict=$(FUZZ_DICT_retry_after) ;; \
	        entry) len=$(FUZZ_LEN_entry); dict=$(FUZZ_DICT_entry) ;; \
	        http) len=$(FUZZ_LEN_http); dict=$(FUZZ_DICT_http) ;; \
	        rewrite) len=$(FUZZ_LEN_rewrite); dict=$(FUZZ_DICT_rewrite) ;; \
	        jscan) len=$(FUZZ_LEN_jscan); dict=$(FUZZ_DICT_jscan) ;; \
        uphead) len=$(FUZZ_LEN_uphead); dict=$(FUZZ_DICT_uphead) ;; \
	        compat) len=$(FUZZ_LEN_compat); dict=$(FUZZ_DICT_compat) ;; \
	        *) len=4096; dict= ;; \
	    esac; \
	    dopt=; [ -n "$$dict" ] && [ -f $(FUZZ_DIR)/dict/$$dict.dict ] && dopt=-dict=$(FUZZ_DIR)/dict/$$dict.dict; \
	    echo "  FUZZ    $$t for $(FUZZ_SECONDS)s (-max_len=$$len $$dopt)"; \
	    $(FUZZ_BUILD)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=$$len $$dopt \
	        -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$t- \
	        $(FUZZ_BUILD)/corpus/$$t $(FUZZ_DIR)/corpus/$$t >$$log 2>&1; \
	    rc=$$?; \
	    runs=$$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 execs in \2 s/p' $$log | tail -n 1); \
	    cov=$$(grep -E '^#[0-9]+.*cov: ' $$log | tail -n 1 | sed -n 's/.*\(cov: [0-9]*\) \(ft: [0-9]*\).*\(corp: [^ ]*\).*/\1 \2 \3/p'); \
	    if [ $$rc -eq 0 ]; then \
	        echo "FUZZ $$t: $${runs:-? execs}, $$cov, no crash"; \
	    else \
	        failed=$$((failed + 1)); \
	        echo "FUZZ $$t: CRASH (exit $$rc) after $${runs:-? execs}, $$cov; log $$log"; \
	        ls $(FUZZ_BUILD)/artifacts/$$t-* 2>/dev/null | sed 's/^/    reproducer: /'; \
	        grep -m 3 -E 'ERROR: |runtime error:|^[a-z].*: .*differ|abort' $$log | sed 's/^/    /'; \
	    fi; \
	done; \
	[ $$failed -eq 0 ]

# Each target once over its committed corpus (what `make test` runs).  On a
# failure the inputs are run one by one to name the one that fails.
fuzz-replay: fuzz-build
	@mkdir -p $(FUZZ_BUILD)/logs $(FUZZ_BUILD)/artifacts
	@passed=0; failed=0; for t in $(FUZZ_TARGETS); do \
	    log=$(FUZZ_BUILD)/logs/replay-$$t.log; \
	    n=$$(ls $(FUZZ_DIR)/corpus/$$t 2>/dev/null | wc -l); \
	    if [ "$$n" -eq 0 ]; then \
	        echo "FAIL fuzz_replay_$$t: no seeds in $(FUZZ_DIR)/corpus/$$t"; failed=$$((failed + 1)); continue; \
	    fi; \
	    if $(FUZZ_BUILD)/fuzz_$$t -runs=0 -artifact_prefix=$(FUZZ_BUILD)/artifacts/replay-$$t- \
	            $(FUZZ_DIR)/corpus/$$t >$$log 2>&1; then \
	        echo "PASS fuzz_replay_$$t ($$n inputs)"; passed=$$((passed + 1)); \
	    else \
	        bad=; for in in $(FUZZ_DIR)/corpus/$$t/*; do \
	            $(FUZZ_BUILD)/fuzz_$$t -artifact_prefix=$(FUZZ_BUILD)/artifacts/replay-$$t- \
	                $$in >$$log.one 2>&1 || { bad=$$in; break; }; \
	        done; \
	        why=$$(grep -m 1 -E 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' $$log.one | \
	               sed 's/^==[0-9]*== *//; s/ on address.*//'); \
	        if [ -n "$$why" ]; then \
	            why="$$why$$(grep -m 1 -E '^ *#[0-9]+ .* in [a-zA-Z_0-9]+ .*src/' $$log.one | \
	                         sed 's/.* in \([a-zA-Z_0-9]*\) .*\(src\/[^ ]*\).*/ in \1 \2/')"; \
	        else \
	            why=$$(grep -m 1 -B 1 'ERROR: libFuzzer' $$log.one | head -n 1); \
	        fi; \
	        echo "FAIL fuzz_replay_$$t: $${bad:-?}: $$why (log $$log.one)"; \
	        failed=$$((failed + 1)); \
	    fi; \
	done; \
	echo "RESULT passed=$$passed failed=$$failed"; \
	[ $$failed -eq 0 ]

-include $(wildcard $(FUZZ_BUILD)/obj/*.d)

.DEFAULT_GOAL := $(fuzz_saved_goal)
