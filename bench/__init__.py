"""Benchmarks of the Trigger Service, each measured beside a raw NATS baseline in the same run.

`python -m bench` (or `make bench`) starts its own nats-server, the service, the sidecar and the
baselines as separate processes, runs every case several times, prints the table and writes it
into `bench/RESULTS.md`. `BENCH_QUICK=1` makes a fast smoke run; `python -m bench --profile`
writes pyinstrument profiles of the service and the sidecar under load to `bench/profiles/`.
"""
