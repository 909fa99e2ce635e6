"""storage.jsonable: the one helper that turns run summaries and metrics into strict JSON."""
from __future__ import annotations

import json
import math

import numpy as np

from mmbatch.engine.storage import jsonable


def test_jsonable_is_strict_json():
    value = {1: (np.float32(0.5), np.int64(3)), "s": {"b", "a"}, "inf": math.inf, "nan": float("nan"),
             "arr": np.array(2.5), "path": __import__("pathlib").Path("/x"), "none": None, "ok": True}
    out = jsonable(value)
    assert out == {"1": [0.5, 3], "s": ["a", "b"], "inf": "inf", "nan": "nan", "arr": 2.5, "path": "/x",
                   "none": None, "ok": True}
    assert type(out["1"][1]) is int and type(out["ok"]) is bool
    text = json.dumps(out, allow_nan=False)                     # would raise on a NaN/Infinity left in
    assert json.loads(text) == out
