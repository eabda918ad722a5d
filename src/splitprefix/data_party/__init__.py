"""What each data party runs: its part of the model, training and generation."""
