"""The saved-memory ledger (see ledger.py) and its CLI (python -m tempo_ds.memory)."""
from .ledger import LedgerReport, SavedRecord, SavedTensorLedger, category_of, measure

__all__ = ["LedgerReport", "SavedRecord", "SavedTensorLedger", "category_of", "measure"]
