"""The indexing workload: documents → chunks → embeddings → a versioned Milvus collection.

`python -m ragtune_workloads.index --config FILE` runs one indexing pass for a VectorIndex; `retrieval` is the
read side the serving workload uses. See `store` for how versions are published without stopping readers.
"""
