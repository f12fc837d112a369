"""Pure functions from a custom resource to the Kubernetes objects that run it. No I/O here."""
