"""The fine-tuning workload: `python -m ragtune_workloads.finetune --config FILE`.

It reads a FineTuneConfig, validates the rows, trains a LoRA adapter (unsloth on NVIDIA GPUs, trl + peft
elsewhere), evaluates it on the held-out split, writes the adapter, optional merged model and GGUF, and a metadata
file with a digest of the artifact, and reports progress and the result to the operator.
"""
