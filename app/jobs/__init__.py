"""A job's lifecycle, one module per concern. From the bottom up: `states` (statuses and
transitions, as data), `ownership` (the fence on a worker's writes), `events` (the job's event
log), `attempts` (a stage's attempts), `history` (training epochs), `search` (a search's
branches and candidates), `lifecycle` (every change of a job's status), `workers` (worker
presence, and releasing a dead worker's jobs), `reaper` (the pass that finds jobs whose worker
is gone, and its thread). Each imports only those before it."""
