"""Corpus stage: read biomedical sources, clean, deduplicate, decontaminate, mix, write shards."""
