# syntax=docker/dockerfile:1
#
# hybrid-worker's container image: the daemon, the workers, and each worker's hash-pinned venv.
#
#   docker build -t hybrid-worker:dev .
#   docker run --rm --init hybrid-worker:dev workers verify
#
# Stages: `build` compiles the binary with the locked dependency set; `runtime` is Debian slim
# with Debian's python3 (jobs run as the image's non-root user and must reach the interpreter,
# so it lives in /usr, never under a root-only folder), the workers, and their venvs built at
# image build time. The image runs with a read-only root file system: the only writable path it
# needs is /tmp (the pod mounts an emptyDir there; `engine.temp_dir` = /tmp/jobs).
# deploy/operator-guide.md explains every setting below; deploy/validate.sh lints this file and
# checks that every COPY source exists and is not excluded by .dockerignore, and
# deploy/image-smoke.sh runs the runtime stage's own steps in a Debian file system (no Docker).

# 1.90 is the oldest toolchain the locked dependencies accept (ordered-float's rust-version);
# this is the toolchain the project is developed and tested with.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
# Base image digests ("@sha256:<64 hex>"), so that a rebuild gets the same bases. Empty means
# the tag's current image. deploy/operator-guide.md ("Pinning the base images") gives the
# commands that resolve and commit them; deploy/validate.sh checks their form, and refuses
# empty ones when REQUIRE_PINNED_BASES=1 (release builds).
ARG RUST_DIGEST=
ARG DEBIAN_DIGEST=

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE}${RUST_DIGEST} AS build
# aws-lc-sys (rustls' crypto) and the bundled SQLite are C code: the slim image has gcc;
# cmake (with make) is aws-lc-sys's fallback build system.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Cargo.toml names this example's path, so the manifest does not load without it.
COPY bench/sandbox/main.rs bench/sandbox/main.rs
COPY config/ config/
COPY src/ src/
# The Service Bus emulator the daemon embeds is a crate of the workspace.
COPY crates/ crates/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin hybrid-worker \
    && install -D -m 0755 target/release/hybrid-worker /out/hybrid-worker
# The image gets the binary without debug info (the release profile keeps line tables for
# backtraces); the debug info goes to its own file, linked by a .gnu_debuglink section, that
# the `debug` stage exports: docker build --target debug --output type=local,dest=out .
RUN objcopy --only-keep-debug /out/hybrid-worker /out/hybrid-worker.debug \
    && objcopy --strip-debug --add-gnu-debuglink=/out/hybrid-worker.debug /out/hybrid-worker

FROM scratch AS debug
COPY --from=build /out/hybrid-worker.debug /

FROM debian:${DEBIAN_RELEASE}-slim${DEBIAN_DIGEST} AS runtime
# python3 + python3-venv: the interpreter every worker venv is built from (/usr/bin/python3).
# ca-certificates: TLS to Service Bus (AMQP on 5671) and to Entra ID.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# A fixed, non-root uid and gid: the Deployment's securityContext names the same numbers.
RUN groupadd --system --gid 10001 hybrid \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin hybrid

COPY --from=build /out/hybrid-worker /usr/local/bin/hybrid-worker
COPY workers/ /opt/hybrid-worker/workers/

ENV HYBRID__WORKERS__DIR=/opt/hybrid-worker/workers \
    HYBRID__WORKERS__VENV_ROOT=/opt/hybrid-worker/venvs \
    HYBRID__WORKERS__PYTHON=/usr/bin/python3 \
    HYBRID__ENGINE__TEMP_DIR=/tmp/jobs \
    HYBRID__EMULATOR__DATA_DIR=/tmp/emulator \
    HYBRID__HTTP__LISTEN=0.0.0.0:9090 \
    HYBRID__LOG__FORMAT=json \
    HYBRID__SERVICEBUS__EMBEDDED=never \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Every worker's venv, from its hash-pinned requirements (pip in hash-checking mode), owned by
# root and readable by all: jobs read them, nothing writes them at run time. `workers verify`
# fails the build if any venv is missing or stale. Bytecode is compiled now, because the root
# file system is read-only at run time.
RUN HYBRID__LOG__FORMAT=text hybrid-worker workers build \
    && HYBRID__LOG__FORMAT=text hybrid-worker workers verify \
    && python3 -m compileall -q /opt/hybrid-worker/workers \
    && chmod -R a+rX /opt/hybrid-worker

# The venvs are built ahead, so the daemon must never try to build them on a read-only file
# system: with a missing or stale venv it refuses to start and names `workers build`.
ENV HYBRID__ENGINE__BUILD_VENVS_ON_START=false
# Fail closed on a weakened sandbox: every mechanism an AKS node gives a non-root pod must be
# on, or the daemon refuses to start (exit 2) naming what is off and why. (A non-root pod has
# no uid of its own per job and no delegated cgroup: `user`, `processes` and `cgroup*` are
# required by the user-namespace overlay instead, where the node gives them.) A node pool
# whose kernel lacks Landlock, or whose seccomp profile blocks it, is refused, not used weakly.
ENV HYBRID__SANDBOX__REQUIRE=rlimits,oom_score_adj,no_new_privs,seccomp,landlock

WORKDIR /opt/hybrid-worker
USER 10001:10001
# Metrics (/metrics) and probes (/healthz, /readyz).
EXPOSE 9090
# SIGTERM drains (engine.drain_timeout_s); the pod's grace period must cover it (see
# deploy/operator-guide.md). Outside Kubernetes, run with `--init` so that a reaper is PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["hybrid-worker"]
CMD ["run"]
