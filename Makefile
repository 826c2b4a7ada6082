# vmk — the two commands a fresh machine needs:
#   make run    build the demo kernel and boot it (serial on this terminal)
#   make test   run the test suite
# Both create .venv and install vmk into it (editable) on first use.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
VMK     := $(VENV)/bin/vmk
STAMP   := $(VENV)/.installed-stamp
OUT     ?= out
BOOT    ?=
GUEST   := $(OUT)/guest

.PHONY: run run-console run-pipeline run-baremetal test fuzz bench lint guest clean pyc

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(MAKE) -s pyc
	touch $@

# Byte-compile vmk's modules: with PYTHONDONTWRITEBYTECODE set (as on CI hosts)
# every vmk process would otherwise compile them again (~60 ms per start-up).
pyc:
	$(PY) -m compileall -q -x '/(\.venv|out|build)/' __init__.py machine boot hal kernel tools testing

guest:
	$(MAKE) -s -C guest OUT=$(abspath $(GUEST))

run: run-console

# The VM kernel's console demo: pid 1 is a shell on COM1 (try: help, ps, spawn hello).
run-console: $(STAMP)
	@mkdir -p $(OUT)
	$(VMK) build demo/console/console.toml -o $(OUT)/console.img
	$(VMK) boot $(OUT)/console.img

# Three containers in a pipeline over channels (timer-driven, interrupt-driven, output).
# BOOT adds vmk boot options, e.g. make run-pipeline BOOT="--trace out/pipeline.perfetto-trace --vcd out/irq.vcd"
run-pipeline: $(STAMP)
	@mkdir -p $(OUT)
	$(VMK) build demo/pipeline/pipeline.toml -o $(OUT)/pipeline.img
	$(VMK) boot $(OUT)/pipeline.img $(BOOT)

# The bare-metal demo kernel (guest/demo): timer ticks and an echo, 'q' quits.
run-baremetal: $(STAMP) guest
	$(VMK) boot $(GUEST)/demo.elf

test: $(STAMP) guest
	$(PY) -m pytest

# The long syscall fuzz (tests/kernel/test_fuzz_guest.py, test_fuzz_syscalls.py): 1e6 random
# syscalls from guest containers per policy and more hypothesis examples; the seed is random and
# printed (VMK_FUZZ_SEED=N repeats a run; VMK_FUZZ_KNOWN_BUGS=0 leaves out the known bugs' classes).
fuzz: $(STAMP) guest
	VMK_FUZZ_SYSCALLS=$${VMK_FUZZ_SYSCALLS:-1000000} VMK_FUZZ_SEED=$${VMK_FUZZ_SEED:-random} \
	VMK_FUZZ_EXAMPLES=$${VMK_FUZZ_EXAMPLES:-500} \
	$(PY) -m pytest -s -p no:cacheprovider tests/kernel/test_fuzz_guest.py tests/kernel/test_fuzz_syscalls.py

bench: $(STAMP) guest pyc
	$(VMK) bench

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check machine boot hal kernel tools testing

clean:
	rm -rf $(OUT) .pytest_cache
