"""The workloads' sizes, shared by ours and the peers (no ml_platform import: the peers'
interpreter reads this too)."""

FANOUT_WIDTH = 1000
#: The wide fan-out: ten times FANOUT_WIDTH (the `wide` section: cost must grow linearly).
WIDE_WIDTH = 10_000
CHAIN_LENGTH = 10
#: Chains run one after another after the fan-out, in each repetition: the first is the
#: chain of the goals; all of them together, the same code measured many times.
CHAINS_IN_A_ROW = 8
SLEEP_TASKS = 1000
SLEEP_SECONDS = 0.010
CRASH_TASK_SECONDS = 5.0
STORM_TASKS = 40
STORM_TASK_SECONDS = 1.0
STORM_KILLS = 5
STARTUP_KILLS = 20
