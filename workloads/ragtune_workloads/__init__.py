"""ragtune's workloads: standalone programs a Job or a Ray Serve app runs. They never import kopf."""
