# musehubd — build, run, test. See README.md.
#
#   make            build build/musehubd (warning-free, -Werror)
#   make deps       install every Debian/npm package the project needs
#   make run        deps + build + throwaway PostgreSQL under var/ + serve on 127.0.0.1:1337
#   make test       deps + build + C unit tests + fuzz corpus replay + end-to-end suite (fs and s3),
#                   then unit and end-to-end tests again under ASan + UBSan (slow-marked tests skipped)
#   make test-asan  unit and end-to-end tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   make bench      benchmarks side by side (scripts/bench)
#   make fuzz       run every libFuzzer target for FUZZ_SECONDS each
#   make clean

BUILD   ?= build
SAN     ?= 0
CC      ?= gcc
PKGS    := libuv libpq jansson msgpack libcurl libcrypto
LLHTTP_DIR := /usr/share/llhttp
LLHTTP_INC := /usr/share/include/llhttp

CFLAGS_BASE := -std=c11 -D_GNU_SOURCE -g -Wall -Wextra -Werror -Wshadow -Wno-missing-field-initializers \
               -Iinclude -I$(LLHTTP_INC) $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS  := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lmbedtls -lmbedx509 -lmbedcrypto -lpthread -lm

ifeq ($(FUZZ),1)
  OPT := -O1 -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined
else ifeq ($(SAN),1)
  OPT := -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
  LDFLAGS += -fsanitize=address,undefined
else
  OPT := -O2
endif
CFLAGS  ?=
CFLAGS  += $(CFLAGS_BASE) $(OPT)

LIB_SRC  := $(filter-out src/main.c,$(wildcard src/*/*.c))
LIB_OBJ  := $(patsubst %.c,$(BUILD)/obj/%.o,$(LIB_SRC))
GEN_OBJ  := $(BUILD)/obj/gen/migrations.o
UNIT_SRC := $(wildcard test/unit/test_*.c)
UNIT_BIN := $(patsubst test/unit/%.c,$(BUILD)/test/%,$(UNIT_SRC))

include third_party/llhttp.mk

.PHONY: all deps run test test-asan unit e2e e2e-s3 bench fuzz fuzz-replay clean
all: $(BUILD)/musehubd

$(BUILD)/obj/%.o: %.c $(wildcard include/mh/*.h) $(wildcard src/*/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

# Migrations are embedded in the binary: sql/NNNN_name.sql -> a C array.
$(BUILD)/gen/migrations.c: $(sort $(wildcard sql/*.sql)) scripts/embed-sql.sh
	@mkdir -p $(dir $@)
	sh scripts/embed-sql.sh $(sort $(wildcard sql/*.sql)) > $@

$(BUILD)/obj/gen/migrations.o: $(BUILD)/gen/migrations.c include/mh/db.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libmh.a: $(LIB_OBJ) $(GEN_OBJ) $(LLHTTP_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/musehubd: $(BUILD)/obj/src/main.o $(BUILD)/libmh.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/test/%: test/unit/%.c $(BUILD)/libmh.a test/unit/tap.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itest/unit $(LDFLAGS) -o $@ $< $(BUILD)/libmh.a $(LDLIBS)

deps:
	@sh scripts/deps.sh

run: deps all
	@sh scripts/run.sh

# C unit tests (a throwaway PostgreSQL is started for the db tests), the
# fuzz corpora replayed through every target, then the end-to-end suite.
unit: all $(UNIT_BIN)
	@/usr/bin/python3 scripts/unit-run.py $(UNIT_BIN)

fuzz-replay: all
	@sh scripts/fuzz.sh replay

e2e: all
	@MUSEHUB_BIN=$(CURDIR)/$(BUILD)/musehubd /usr/bin/python3 -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(or $(E2E),test/e2e)

# The push, fetch, jobs and clients suites again with the s3 backend, against an
# S3 emulator that checks signatures (started by the harness).
E2E_S3 ?= test/e2e/test_push.py test/e2e/test_fetch.py test/e2e/test_jobs.py test/e2e/test_clients.py
e2e-s3: all
	@MUSEHUB_BIN=$(CURDIR)/$(BUILD)/musehubd /usr/bin/python3 -m pytest -q -p no:cacheprovider --store s3 $(PYTEST_ARGS) $(E2E_S3)

test: deps
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory unit
	@$(MAKE) --no-print-directory fuzz-replay
	@$(MAKE) --no-print-directory e2e
	@$(MAKE) --no-print-directory e2e-s3
	@$(MAKE) --no-print-directory test-asan PYTEST_ARGS="-m 'not slow'"

test-asan: deps
	@$(MAKE) --no-print-directory BUILD=build-asan SAN=1 all
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(MAKE) --no-print-directory BUILD=build-asan SAN=1 unit e2e

FUZZ_SECONDS ?= 60
fuzz: deps
	@FUZZ_SECONDS=$(FUZZ_SECONDS) sh scripts/fuzz.sh run

# Benchmarks (scripts/bench.py, docs/benchmarks.md); BENCH_ARGS="--quick",
# "--only push,clone", "--large"; BENCH_* variables set the history shape.
bench:
	@sh scripts/deps.sh --bench
	@$(MAKE) --no-print-directory all
	@/usr/bin/python3 scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf build build-asan build-fuzz

# Fault injection, SQLite's method (include/mh/failalloc.h): FAILALLOC=1
# compiles with -DMH_FAILALLOC and links every binary of the build with the
# allocators wrapped, so MH_FAILALLOC_N (or the MH_FAILALLOC_CTL signals)
# can fail the Nth allocation. `make unit-failalloc` builds build-failalloc/
# under ASan, loops N = 1, 2, ... over the codec and mpack workloads
# (test/unit/test_failalloc.c), then injects failures into a running
# server at every N of a push and of a fetch, with the fs and the s3 store
# (test/e2e/test_faults.py -k failalloc; about 10 minutes in all).
FAILALLOC ?= 0
ifeq ($(FAILALLOC),1)
  CFLAGS  += -DMH_FAILALLOC
  LDFLAGS += -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=strdup,--wrap=strndup \
             -Wl,--wrap=mh_alloc,--wrap=mh_calloc \
             -Wl,--wrap=mh_strndup,--wrap=mh_strdup,--wrap=mh_sprintf,--wrap=mh_arena_defer
endif

.PHONY: unit-failalloc
unit-failalloc: deps
	@$(MAKE) --no-print-directory BUILD=build-failalloc SAN=1 FAILALLOC=1 all build-failalloc/test/test_failalloc
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
	  /usr/bin/python3 scripts/unit-run.py build-failalloc/test/test_failalloc
	@for store in fs s3; do \
	  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 MUSEHUB_FAILALLOC_BIN=$(CURDIR)/build-failalloc/musehubd \
	  MUSEHUB_FAILALLOC_SAMPLES=all $(MAKE) --no-print-directory e2e E2E=test/e2e/test_faults.py \
	  PYTEST_ARGS="-k failalloc --store $$store" || exit 1; done
