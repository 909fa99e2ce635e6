"""The engine every stage runs on (docs/architecture.md): nothing here knows a corpus, a feature or a model.

- units.py       units of work on Ray Data actors (retries, lost workers, a second GPU step)
- commit.py      workers write, the driver commits: UnitSink (write, on_write_complete), CommitRecord,
                 Committer (markers, leftovers)
- manifest.py    the one manifest type of every output, and the one way to list its data files
- ownership.py   what mmbatch may delete: outputs never overlap inputs; folders it owns
- capacity.py    what the cluster has and can add, per node type: the one place stages ask
- storage.py     local paths and fsspec URIs, atomic writes, markers, bytes, signatures
- provenance.py  fingerprints of units and weights; a fused folder's consistency check
- runtime.py     starting and stopping Ray, its logs, signals
- progress.py    progress lines and committed-unit counts
"""
