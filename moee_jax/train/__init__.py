"""Training: losses, train state, stages and the trainer loop."""
