"""The benchmark's trivial job: the cost of a job is then all in its transport and process."""


def run(input, ctx):
    return {"n": input.get("n")}
