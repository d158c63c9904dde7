"""Durable storage: RocksDB column families behind a small interface the broker owns."""

from tq.store.keys import CF, pending_key, split_pending_key
from tq.store.rocks import Batch, Store, StoreError

__all__ = ["CF", "Batch", "Store", "StoreError", "pending_key", "split_pending_key"]
