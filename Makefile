# The README's commands (demo, test; lint and test-fast for development). Each
# creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export XLA_FLAGS := --xla_force_host_platform_device_count=8
export JAX_PLATFORMS := cpu

.PHONY: test test-fast test-tpu lint demo wheel install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Ruff over everything; mypy over core/ and the executors against the seam's Protocols
# (pyproject.toml's [tool.mypy] names the files).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# JAX's persistent compilation cache in a folder emptied at each run: every program
# is still compiled once per run, and the many tests (and notebook kernels, which
# inherit the environment) that build identical programs load them instead of
# compiling them again (test_text.py: 56 s without, 36 s with). A size bound turns on
# jax's file lock, so the processes sharing it never read an entry half written.
TEST_CACHE := $(CURDIR)/.test_jax_cache
TEST_ENV := JAX_COMPILATION_CACHE_DIR=$(TEST_CACHE) JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0 JAX_COMPILATION_CACHE_MAX_SIZE=20000000000

# Two pytest workers (pytest-xdist), a test file each at a time, so module fixtures
# are shared as in one process: the suite alone keeps about one of two cores busy
# (a compile, a subprocess, a simulator loop), 24 min serially on this 2-core host.
# Under coverage (pytest-cov with `[tool.coverage]` in pyproject.toml: the library's
# lines run in the workers); the report is printed whether the tests pass or not, and
# gates nothing. Python 3.11's tracer (no sys.monitoring) slows pure-Python simulation
# about 5x (test_planner + test_simulator: 12 s plain, 65 s traced), so those two
# files run after, untraced; engine tests, dominated by XLA, cost about the same.
UNTRACED := tests/test_planner.py tests/test_simulator.py
PYTEST := $(TEST_ENV) $(BIN)/python -m pytest -q -x -p no:cacheprovider
test: $(STAMP)
	rm -rf $(TEST_CACHE) .coverage
	$(PYTEST) -n 2 --dist loadfile --cov --cov-report=term -m "not tpu_extra" tests \
	  $(addprefix --ignore=,$(UNTRACED)) && $(PYTEST) $(UNTRACED)

# Skips the tests marked slow (engines in every mode, profiling, notebooks).
test-fast: $(STAMP)
	rm -rf $(TEST_CACHE)
	$(TEST_ENV) $(BIN)/python -m pytest -q -x -m "not slow and not tpu_extra" tests

# The TPU compile checks alone (kernels, and the whole Llama-3-8B programs for a v5e-8).
test-tpu: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_tpu_compile.py

# Which mode to deploy, twice: the demo model's four modes served on this machine at a
# load where they differ (configs/serve_demo.py), then the planner's pick for OPT-13B on
# 8 A100s (configs/plan_demo.py). Plots go to demo_plots/{serve,plan}/.
demo: $(STAMP)
	$(BIN)/python -m pdserve_jax.cli.serve --config=serve_demo --plots_dir=demo_plots/serve
	$(BIN)/python -m pdserve_jax.cli.plan --config=plan_demo --plots_dir=demo_plots/plan

# A wheel to upload to a Colab runtime (the notebooks' install cell finds it).
wheel: $(STAMP)
	$(BIN)/python -m pip wheel -q --no-deps -w dist .

clean:
	rm -rf $(VENV) dist

# The docs' pictures and the notebooks' outputs, regenerated and saved in the tree
# (commit the result). figures: docs/figures/*.png from the apps that draw them
# (reproduce and plan on the simulator, sweep on this CPU's engine; 15-40 minutes on
# 2 shared cores). notebooks: colabs/*.ipynb executed in place with their outputs.
.PHONY: figures notebooks
figures: $(STAMP)
	$(BIN)/python benchmarks/figures.py

notebooks: $(STAMP)
	$(BIN)/python benchmarks/notebooks.py
