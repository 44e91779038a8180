"""The cache format: the one package both sides share.

Everything about the on-disk layout lives here as data (`schema.DATASETS`, the typed `manifest`), together with what
reads, writes, encodes and checks it (`reader`, `shard_io`, `encodings`, `codec*`, `verify`), the dataset input
formats both sides load text from (`text_data`), the one error module (`errors`) and the file helpers (`fsutil`).
The teacher side (`cache_tools`) builds on it; the student side (`distill`) imports `cache_tools` through this package
only (`tests/test_architecture.py`)."""
