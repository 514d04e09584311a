"""Data parallelism over torch.distributed: the ranks of a run, which blocks each updates, the
commit every rank makes together."""
