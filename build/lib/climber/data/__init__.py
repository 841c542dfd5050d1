"""Data: readers for interaction logs, the event schema, and SUMI sample preparation."""
