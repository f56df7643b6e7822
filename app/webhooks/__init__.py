"""Webhooks: where a job's events are sent (targets), the deliveries recorded with each state
change and their every attempt (outbox), and how one attempt is signed and sent (sender).
The Celery task that drives a delivery is worker/webhooks.py."""
