# llhttp 8.1.0 from Debian's node-llhttp package, which ships the C sources
# (/usr/share/llhttp/{llhttp,api,http}.c) but no library: compile them into
# the build. Nothing is copied into this repository.
LLHTTP_SRC := llhttp api http
LLHTTP_OBJ := $(patsubst %,$(BUILD)/obj/llhttp/%.o,$(LLHTTP_SRC))

$(BUILD)/obj/llhttp/%.o: $(LLHTTP_DIR)/%.c
	@mkdir -p $(dir $@)
	$(CC) $(filter-out -Wshadow,$(CFLAGS)) -Wno-unused-parameter -c $< -o $@
