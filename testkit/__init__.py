"""Test equipment shared by the tests, the rehearsals (deploy/sim) and the benchmarks: a real
GCS server behind a fault proxy. Production code (vitpod/, deploy/ outside deploy/sim)
imports nothing from here.
"""
