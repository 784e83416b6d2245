"""Reference logits of the source model, and validation of every variant against them."""
