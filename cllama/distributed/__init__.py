"""Notebook 05, distribution: parallel settings (`parallel`), strategy files (`strategy`), HCCL rank
tables (`ranktable`) and checkpoint split/merge/re-shard (`transform`)."""
