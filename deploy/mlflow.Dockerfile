# MLflow tracking server with basic auth (Flask-WTF via the `auth` extra), PostgreSQL (psycopg2) and S3 (boto3).
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg2-binary>=2.9" "boto3>=1.34" \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /mlartifacts /var/lib/mlflow-auth && chown mlflow:mlflow /mlartifacts /var/lib/mlflow-auth
USER mlflow
