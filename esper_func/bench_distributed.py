"""`python -m esper_func.bench_distributed`: runs `esper_func.perf.bench_distributed` (the distributed benchmark)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("esper_func.perf.bench_distributed", run_name="__main__", alter_sys=True)
