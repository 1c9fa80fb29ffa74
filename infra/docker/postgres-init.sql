-- The MLflow database beside Prefect's (POSTGRES_DB creates "prefect").
CREATE DATABASE mlflow;
