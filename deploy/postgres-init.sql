-- Runs once, when the PostgreSQL volume is first created: Prefect uses the database `prefect` (POSTGRES_DB),
-- MLflow its own database next to it.
CREATE DATABASE mlflow;
