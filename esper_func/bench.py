"""`python -m esper_func.bench`: runs `esper_func.perf.bench` (the train-step benchmark)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("esper_func.perf.bench", run_name="__main__", alter_sys=True)
