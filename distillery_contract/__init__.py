"""The words the API, the worker and the client agree on, each spelled once: job and stage
statuses (`states`), error codes and the error base both sides raise (`errors`), webhook event
names and delivery statuses (`webhooks`).

Pure Python (the standard library only): `app`, `worker` (its pipeline included) and the thin
client `distillery` may all import it, and it imports none of them. It ships in the thin
wheel with the client. A string protocol that crosses a process boundary belongs here; its
words appear elsewhere only in tests and docs."""
