# The probe image: the `probe` command (run, canary, exporter, pipeline) and `locust` with the
# probe's locustfiles. Slim, non-root, every version pinned:
#   - the base image by tag and digest (python 3.11 on Debian bookworm, slim);
#   - Debian packages by version (libsndfile1 for soundfile);
#   - Python packages by deploy/constraints.txt (the whole runtime closure, `==` each),
#     installed first, then the probe itself with --no-deps, then `pip check`.
# Build: docker build -t probe:0.1.0 .   (docker compose builds it as probe:local)

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/constraints.txt /tmp/constraints.txt
# Only binary wheels: nothing here needs a compiler, and a source build would be a surprise.
RUN pip install --only-binary=:all: -r /tmp/constraints.txt \
    && pip install --only-binary=:all: setuptools==84.2.1 wheel==0.48.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY probe ./probe
RUN pip install --no-deps --no-build-isolation . \
    && pip uninstall -y setuptools wheel \
    && pip check

FROM ${PYTHON_IMAGE}
ARG LIBSNDFILE_VERSION=1.2.0-1+deb12u1
RUN apt-get update \
    && apt-get install -y --no-install-recommends "libsndfile1=${LIBSNDFILE_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 probe \
    && useradd --system --uid 10001 --gid probe --home-dir /opt/probe --shell /usr/sbin/nologin probe
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/probe
COPY audio_fixtures ./audio_fixtures
COPY scenarios ./scenarios
COPY deploy/scenarios ./deploy/scenarios
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROBE_FIXTURES=/opt/probe/audio_fixtures
USER 10001:10001
# 8765 reference pipeline, 8766 sink, 8089 Locust web UI, 5557 Locust master, 9646 worker
# metrics, 9116 exporter.
EXPOSE 8765 8766 8089 5557 9646 9116
ENTRYPOINT ["probe"]
CMD ["--help"]
