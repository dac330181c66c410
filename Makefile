# sdmesh: Stable Diffusion 2.x as a mesh of gRPC services.
#   make run    build, start the mesh on MODEL, generate one image, stop
#   make test   every test (parity with diffusers, services, end to end across processes)
#   make bench  the benchmarks (release build; results in benchmarks/results/)

MODEL   ?= tests/fixtures/models/sd21-tiny
PROMPT  ?= a photograph of an astronaut riding a horse
OUT     ?= out/sdmesh.png
LISTEN  ?= 127.0.0.1:50050
SEED    ?= 42
STEPS   ?=
ARGS    ?=
CARGO   ?= cargo

.PHONY: build run test test-deps bench fixtures clean

build:
	$(CARGO) build --bins

run: build
	@mkdir -p $(dir $(OUT))
	@echo "starting the mesh on $(MODEL) (orchestrator on $(LISTEN))"
	@target/debug/sdmesh serve --model "$(MODEL)" --listen $(LISTEN) > out/sdmesh-serve.log 2>&1 & \
	  pid=$$!; trap "kill $$pid 2>/dev/null" EXIT; \
	  target/debug/sdctl generate --endpoint http://$(LISTEN) --wait 600 --prompt "$(PROMPT)" --seed $(SEED) \
	    $(if $(STEPS),--steps $(STEPS)) $(ARGS) --out "$(OUT)" \
	  || { echo "generation failed; the mesh's log is out/sdmesh-serve.log" >&2; exit 1; }; \
	  echo "image written to $(OUT) (mesh log: out/sdmesh-serve.log)"

# The service binaries must exist before the end-to-end tests start them as processes.
test: build test-deps
	$(CARGO) test --workspace --no-fail-fast

# The cache tests run a real redis-server; install it where missing (Debian/Ubuntu, as root
# or with sudo).
test-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (the cache tests start one)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# Benchmarks (not part of make test): release build, random-weight models made with diffusers
# in .venv, results kept under benchmarks/results/. BENCH_QUICK=1 for fewer steps.
bench:
	benchmarks/run.sh

# Regenerates tests/fixtures (tiny models + reference outputs) with diffusers in .venv.
fixtures:
	python3 -m venv .venv
	.venv/bin/pip install -q -r tests/fixtures/requirements.txt
	.venv/bin/python tests/fixtures/generate.py
	.venv/bin/python tests/fixtures/generate_schedulers.py
	.venv/bin/python tests/fixtures/generate_schedulers2.py
	.venv/bin/python tests/fixtures/generate_seeds.py
	.venv/bin/python tests/fixtures/generate_images.py
	.venv/bin/python tests/fixtures/generate_depth.py
	.venv/bin/python tests/fixtures/generate_jobs.py

clean:
	$(CARGO) clean
	rm -rf out
