"""What a user would run instead of gpunn, each doing the same full-batch step, for the benchmark to compare.

Every peer module has ``DTYPES`` (the dtypes it runs) and factories ``make...(images, labels, params, *, lr, dtype,
device) -> Runner``: ``images`` is (m, 784) uint8 as a file or CSV gives it, ``labels`` (m,) int64, ``params`` the
initial ``[(W, b), ...]`` as NumPy arrays (the same for every implementation). A Runner has ``step()`` (one epoch),
``sync()`` (wait for the device) and ``params()`` (the current weights as NumPy arrays, for the equivalence check).
The benchmark's PEERS table names each factory and the devices it runs on. A factory that cannot run where it is
asked to raises; the benchmark reports that as a failed row.
"""
