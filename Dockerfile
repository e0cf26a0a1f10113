# nhi-broker: a slim, non-root image. Build: docker build -t nhi-broker .
# Run:   docker run -p 8080:8080 -e NHI_BROKER_PUBLIC_URL=https://broker.example.org \
#          -e NHI_BROKER_CONFIG=/etc/nhi-broker/broker.toml -v ./broker.toml:/etc/nhi-broker/broker.toml:ro \
#          -v nhi-data:/var/lib/nhi-broker nhi-broker
# Set NHI_BROKER_PUBLIC_URL: it is the issuer of task tokens and must be the URL clients use.
# The image binds every interface, so the trial issuer is OFF: configure [[trust]] (docs/deploy.md).
# Check a configuration without starting: docker run ... nhi-broker config check
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
RUN python -m venv /opt/nhi-broker \
 && /opt/nhi-broker/bin/pip install --upgrade pip \
 && /opt/nhi-broker/bin/pip install .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 nhi \
 && useradd --system --uid 10001 --gid nhi --home-dir /var/lib/nhi-broker --shell /usr/sbin/nologin nhi \
 && install -d -o nhi -g nhi -m 0700 /var/lib/nhi-broker /var/lib/nhi-broker/keys
COPY --from=build /opt/nhi-broker /opt/nhi-broker
COPY policies /etc/nhi-broker/policies
ENV PATH=/opt/nhi-broker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NHI_BROKER_DATA_DIR=/var/lib/nhi-broker \
    NHI_BROKER_POLICIES_DIR=/etc/nhi-broker/policies \
    NHI_BROKER_HOST=0.0.0.0 \
    NHI_BROKER_PORT=8080
USER nhi
WORKDIR /var/lib/nhi-broker
VOLUME ["/var/lib/nhi-broker"]
EXPOSE 8080
# Probes /healthz on the port the settings say (NHI_BROKER_PORT, the config file), not a fixed one.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 CMD ["nhi-broker", "healthcheck"]
ENTRYPOINT ["nhi-broker"]
CMD ["serve"]
