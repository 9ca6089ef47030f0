"""The launch scripts' Python side: the DeepSpeed trainer (train.py) over tempo_ds.workload."""
