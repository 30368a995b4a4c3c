"""The peers' versions of the workloads. Run with the peers' own interpreter (.nox/bench-peers):

    python -m benchmarks.peers SYSTEM REDIS_URL

prints one JSON line per workload: {"workload", "makespan", "tasks", "starts", "peak_rss"}.
Every task notes its start time (and the last one its end) in Redis, the same way for every
peer, so the figures are taken the same way whatever the system's own result handling.
"""
