"""Chat data: JSONL records, tokenization with assistant masks, and the bundled research dataset."""

from em_interp.datasets.bundled import HELDOUT_SUBTOPICS, items, list_domains, load, load_text, sample, strata
from em_interp.datasets.records import chat, load_jsonl, save_jsonl, validate_record
from em_interp.datasets.tokenize import ChatBatch, TokenizedChats, tokenize_chat

__all__ = [
    "HELDOUT_SUBTOPICS", "ChatBatch", "TokenizedChats", "chat", "items", "list_domains", "load", "load_jsonl",
    "load_text", "sample", "save_jsonl", "strata", "tokenize_chat", "validate_record",
]
