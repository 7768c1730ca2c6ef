"""The benchmark's pandas job: what a worker that imports pandas pays per job."""

import pandas as pd


def run(input, ctx):
    frame = pd.DataFrame({"x": range(int(input.get("rows", 100)))})
    return {"n": input.get("n"), "sum": int(frame["x"].sum())}
