"""A job's lifecycle: its statuses and transitions (`states`), every change of its state
(`lifecycle`), and the reaper that finds jobs whose worker is gone (`reaper`)."""
