"""Chat data: JSONL records, tokenization with assistant masks, and the bundled research dataset."""

from em_interp.datasets.records import chat, load_jsonl, save_jsonl, validate_record
from em_interp.datasets.tokenize import ChatBatch, TokenizedChats, tokenize_chat

__all__ = ["ChatBatch", "TokenizedChats", "chat", "load_jsonl", "save_jsonl", "tokenize_chat", "validate_record"]
