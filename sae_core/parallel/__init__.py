"""Training one SAE on several processes: latents sharded S ways, batches split over R replicas."""
