# entropy-proxy: the proxy only (no torch, no vLLM); vLLM runs in its own CUDA image beside it.
#   docker build -t entropy-proxy:0.1.0 .
#   docker run -p 8080:8080 entropy-proxy:0.1.0 serve --upstream http://vllm:8000 --host 0.0.0.0
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY monitors ./monitors
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --uid 10001 --create-home app && mkdir /data && chown app /data
USER 10001
WORKDIR /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["entropy-proxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
