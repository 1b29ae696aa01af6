# FedMQ service, worker and fleet image (one image, three commands).
FROM python:3.11-slim
WORKDIR /app
# The CPU build of torch first and pinned: the default index would pull a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# ExecuTorch (phone packages, emulated phones) without its ~55 declared dependencies;
# pyproject lists the two its exporter and runtime import.
RUN pip install --no-cache-dir --no-deps executorch==1.5.1
COPY pyproject.toml README.md ./
COPY broker broker
COPY model_store model_store
COPY aggregator_service aggregator_service
COPY device_sdk device_sdk
COPY android_bridge android_bridge
COPY ios_bridge ios_bridge
COPY fedmq fedmq
COPY experiments experiments
RUN pip install --no-cache-dir .
ENV FEDMQ_HOME=/data
VOLUME ["/data"]
ENTRYPOINT ["fedmq"]
