import os

# Tests run on 2 cores next to a worker and a database; keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
