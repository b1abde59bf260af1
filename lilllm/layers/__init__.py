"""The building blocks of the model, one idea per module: norms, positions, attention,
feed-forward networks."""
