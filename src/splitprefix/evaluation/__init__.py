"""Loss, perplexity and exact match."""
