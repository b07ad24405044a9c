"""wschat's load generator and benchmark suite: ``python -m loadtest SCENARIO [options]``.

Scenarios (``loadtest.scenarios``): ``idle`` (memory and CPU per idle connection),
``fanout`` (open-loop room fan-out: throughput, latency from the intended send time,
losses), ``churn`` (connect/join/leave/close cycles) and ``slow`` (a share of clients
stops reading). Targets (``loadtest.targets``): wschat (memory and Redis modes) and the
peer servers in ``loadtest/peers``. See loadtest/README.md.
"""
