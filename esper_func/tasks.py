"""`python -m esper_func.tasks`: runs `esper_func.perf.calibration` (the synthetic task's calibration)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("esper_func.perf.calibration", run_name="__main__", alter_sys=True)
