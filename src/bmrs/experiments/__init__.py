"""The work behind the ``bmrs`` commands: post-training sweeps (``curve``), compaction reports (``compact_run``),
pruning a model of your own (``prune_run``), latency (``timing``).  The paper's reproduction is outside the package,
in paper/ of a source checkout."""
