"""Serving (docs/paper.md section 3.2): `engine` holds the model, the user history store and the KV
cache of prefilled histories; `app` puts it behind HTTP with micro-batching."""
