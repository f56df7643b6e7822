"""Write examples/tabular/wine.npz from scikit-learn's built-in wine data (offline):
feature rows `x` (N, 13), integer labels `y`, class names `classes`."""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_wine

if __name__ == "__main__":
    d = load_wine()
    out = Path(__file__).with_name("wine.npz")
    np.savez(
        out,
        x=d.data.astype(np.float32),
        y=d.target.astype(np.int64),
        classes=np.array(d.target_names),
    )
    print(out)
