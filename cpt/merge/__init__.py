"""Model arithmetic behind `cpt merge`: checkpoint averages, interpolations and instruction residuals,
streamed tensor by tensor from Hugging Face directories or cpt checkpoints."""
