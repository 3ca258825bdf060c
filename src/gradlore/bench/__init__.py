"""Benchmarks: side by side with torch AdamW and the peer packages (`gradlore bench ...`)."""
