# ecl-pipeline: installs exactly as CI does (pip install of this project on Python 3.11).
# PyPI's torch wheels bring CUDA, so `docker run --gpus all` trains on the GPU.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    HF_HUB_OFFLINE=1 \
    MLFLOW_TRACKING_URI=sqlite:////mlflow/mlflow.db

WORKDIR /opt/ecl
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY data_prep ./data_prep
COPY configs ./configs
COPY reports ./reports
RUN pip install . \
 && useradd --create-home --uid 1000 ecl \
 && mkdir -p /data /mlflow /work \
 && chown -R ecl:ecl /data /mlflow /work

USER ecl
WORKDIR /work
# /data: cohorts and caches; /mlflow: the tracking store (sqlite + artifacts) that outlives the container.
VOLUME ["/data", "/mlflow"]

ENTRYPOINT ["ecl"]
CMD ["demo"]
