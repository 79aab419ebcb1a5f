FROM python:3.11-slim
WORKDIR /app
# torch and torchvision pinned together (a mismatched torchvision fails to import).
RUN pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md alembic.ini ./
COPY searchsvc searchsvc
COPY workers workers
COPY trainer trainer
COPY migrations migrations
RUN pip install --no-cache-dir .
RUN useradd --create-home searchsvc && mkdir -p /data && chown searchsvc /data
USER searchsvc
