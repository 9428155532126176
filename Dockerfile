# jobworkerd in a container. It makes cgroups and namespaces for each job, so it needs a
# privileged container with its own cgroup namespace; see docs/operations.md, "Container":
#
#   docker build -t jobworkerd .
#   docker run -d --name jobworkerd --privileged --cgroupns=private --init \
#     -v /etc/jobworker:/etc/jobworker:ro -v jobworker-state:/var/lib/jobworker \
#     -p 50051:50051 jobworkerd
#
# Jobs run inside the container: the commands they can run are the image's.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN --mount=from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels jobworker \
    && install -d -m 0700 /var/lib/jobworker \
    && install -d -m 0755 /etc/jobworker
VOLUME /var/lib/jobworker
EXPOSE 50051
# The settings live in /etc/jobworker/config.toml (mount it); inside the container the
# server listens on every address, and the published port decides who reaches it.
ENTRYPOINT ["jobworkerd", "--config", "/etc/jobworker/config.toml", "--listen", "0.0.0.0:50051"]
