# pulid-flux in a CUDA image: `docker compose` in docs/deployment.md builds it (`build: .`).
#   docker build -t pulid-flux .
#   docker run --gpus all -p 8000:8000 -v pulid-weights:/home/pulid/.cache/pulid-flux pulid-flux
# No Docker engine runs on the development machines, so this file is not built by CI; what CI
# checks (tests/test_dockerfile.py) is that it installs with scripts/install, the very command
# scripts/serve and scripts/test run, so the image and a checkout cannot drift apart.
# torch's wheel brings its own CUDA 13 libraries; the base image supplies a matching runtime.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

# /keys and the weights cache exist, owned by the user, so that volumes mounted there are writable.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1001 pulid \
 && install -d -o pulid -g pulid /app /keys /home/pulid/.cache /home/pulid/.cache/pulid-flux

USER pulid
WORKDIR /app
COPY --chown=pulid:pulid . /app
# pip's cache survives between builds (BuildKit), so a source change does not download torch again.
RUN --mount=type=cache,target=/home/pulid/.cache/pip,uid=1001,gid=1001 scripts/install

ENV PATH=/app/.venv/bin:$PATH \
    PULID_FLUX_DATA_DIR=/app/data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
# Listens on all interfaces inside the container: give it --api-key (or PULID_FLUX_API_KEYS) before
# publishing the port beyond this host.
CMD ["pulid-flux", "serve", "--host", "0.0.0.0"]
