"""Prefect tasks: each wraps one library step (modelpress.stages) with retries, timeouts,
progress and artifacts. No compression logic lives here."""
