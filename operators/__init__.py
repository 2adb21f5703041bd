"""Airflow side of seekflow: operators and compute backends. Imports no torch, megatron or mlflow."""
