"""Regenerate combat_reference.json: reference ComBat values from neuroCombat 0.2.12.

Not run by the tests (neuroCombat is not a dependency). To regenerate::

    pip download --no-deps neuroCombat==0.2.12 && tar xzf neuroCombat-0.2.12.tar.gz
    PYTHONPATH=neuroCombat-0.2.12 python tests/data/make_combat_reference.py

The data are small and rounded before the reference run, so the fixture holds exactly
the numbers neuroCombat saw. Ages are multiples of 0.25 years because neuroCombat casts
continuous covariates to float32 (those values are exact in float32).
"""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from neuroCombat import neuroCombat

rng = np.random.default_rng(20070101)
n_by_site = {"A": 11, "B": 16, "C": 21}
site = np.concatenate([[s] * n for s, n in n_by_site.items()])
n = site.size
n_features = 7
age = np.round(rng.uniform(40, 75, n) * 4) / 4
sex = rng.choice(["F", "M"], n)
loc = {"A": 0.0, "B": 0.8, "C": -0.5}
scale = {"A": 1.0, "B": 1.6, "C": 0.7}
feature_loc = rng.normal(0.0, 0.3, n_features)
data = np.empty((n_features, n))
for j in range(n):
    data[:, j] = (10 + 0.05 * (age[j] - 57) + 0.4 * (sex[j] == "M")
                  + loc[site[j]] + feature_loc
                  + scale[site[j]] * rng.normal(0.0, 1.0, n_features))
data = np.round(data, 6)
covars = pd.DataFrame({"site": site, "age": age, "sex": sex})
with contextlib.redirect_stdout(io.StringIO()):
    out = neuroCombat(dat=data.copy(), covars=covars, batch_col="site",
                      categorical_cols=["sex"], continuous_cols=["age"])
est = out["estimates"]
reference = {
    "source": "neuroCombat 0.2.12 (parametric EB, eb=True, mean_only=False)",
    "data": data.tolist(), "site": site.tolist(), "age": age.tolist(), "sex": sex.tolist(),
    "harmonised": out["data"].tolist(),
    "gamma_hat": np.asarray(est["gamma_hat"]).tolist(),
    "delta_hat": np.asarray(est["delta_hat"]).tolist(),
    "gamma_star": np.asarray(est["gamma.star"]).tolist(),
    "delta_star": np.asarray(est["delta.star"]).tolist(),
    "var_pooled": np.asarray(est["var.pooled"]).ravel().tolist(),
}
Path(__file__).with_name("combat_reference.json").write_text(json.dumps(reference, indent=1))
