"""Several ranks as one run: the process group and the rank-fault protocol."""
