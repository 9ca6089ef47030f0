"""The launch scripts' Python side: model builders (models.py) and the trainer (train.py)."""
