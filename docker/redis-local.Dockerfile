# Redis for local runs only (docker-compose.local.yml): Debian's redis-server on the base that
# docker/local-base.sh builds, for machines that cannot pull docker-compose.yml's redis image.
# A real deployment uses that image; this one exists so the whole stack can start without a
# registry.
#
#   docker build -f docker/redis-local.Dockerfile --network host -t citi-redis:local .

ARG BASE_IMAGE

FROM ${BASE_IMAGE:-citi-local/python:3.11-bookworm}

ARG DEBIAN_FRONTEND=noninteractive
# Debian's bookworm package (Redis 7.0): it is what the local base can install, and the job store
# needs nothing newer. Its patch releases are security updates and are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && chown redis:redis /data

# Debian's redis user; its uid is allocated when the package installs, hence the name.
# hadolint ignore=DL3066
USER redis
WORKDIR /data
EXPOSE 6379

CMD ["redis-server", "--bind", "127.0.0.1", "--protected-mode", "yes"]
